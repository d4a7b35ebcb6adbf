#!/usr/bin/env bash
# End-to-end benchmark on a real Apache Kafka broker, run by hand (never in CI): builds the
# release service and the bench (integration-tests/src/bin/e2e_bench/), then runs the bench
# with the arguments given, e.g.
#
#   bash scripts/bench-e2e.sh --records 100000 --keys 1000          # a quick run
#   bash scripts/bench-e2e.sh --timeout 45m --json bench.json       # the full workload (2M records)
#
# `--help` lists the flags. The table goes to stdout, progress to stderr. Needs Java 17+ and
# Maven for the broker (scripts/install-kafka.sh), like the integration tests.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --bin checkpointer
cargo build --release -p integration-tests --bin e2e_bench

target="${CARGO_TARGET_DIR:-target}"
case "$target" in
    /*) ;;
    *) target="$PWD/$target" ;;
esac
# the service under test is the release build just made, whatever the caller's environment says
export CHECKPOINTER_BIN="$target/release/checkpointer"
exec "$target/release/e2e_bench" "$@"
