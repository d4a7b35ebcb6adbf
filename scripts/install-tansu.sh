#!/usr/bin/env bash
# Installs the Kafka-protocol broker the integration tests run against: tansu 0.6.0, with
# in-memory (dynostore) and SQLite (libsql) storage. A no-op when it is already installed.
# Building it takes about 12 minutes on 2 cores.
set -euo pipefail

version="0.6.0"

installed_version() {
    local bin
    for bin in "$(command -v tansu 2>/dev/null || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"; do
        if [[ -n "$bin" && -x "$bin" ]]; then
            # "tansu 0.6.0"
            "$bin" --version 2>/dev/null | awk '{ print $2; exit }'
            return 0
        fi
    done
    return 0
}

if [[ "$(installed_version)" == "$version" ]]; then
    echo "tansu $version already installed"
    exit 0
fi

echo "installing tansu $version (cargo install, this takes a while)"
cargo install tansu --version "$version" --locked --features dynostore,libsql
