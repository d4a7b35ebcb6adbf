#!/usr/bin/env bash
# The project's test command: formatting, lints, build, unit and integration tests.
# The integration tests start a tansu broker and the checkpointer binary themselves.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-tansu.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# Headless Chromium renders the status page in integration-tests/tests/web_page.rs (Debian's
# package). Quiet, and a no-op when it is installed; the package lists are refreshed only when
# the install cannot go ahead without it.
install_chromium() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >/dev/null
}
if ! command -v chromium >/dev/null 2>&1; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "chromium is missing: install it as root (apt-get install chromium)" >&2
        exit 1
    fi
    echo "installing chromium (apt-get)"
    if ! apt-cache show chromium >/dev/null 2>&1 || ! install_chromium; then
        apt-get update -q >/dev/null
        install_chromium
    fi
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --bin checkpointer
cargo test --workspace --no-fail-fast
