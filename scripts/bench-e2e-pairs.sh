#!/usr/bin/env bash
# Two builds of the service end to end on a real Apache Kafka broker, in interleaved pairs, run
# by hand (never in CI): builds the bench tools (integration-tests/src/bin/e2e_pairs.rs and
# e2e_bench), then compares the two service binaries given, e.g.
#
#   bash scripts/bench-e2e-pairs.sh --a old=/tmp/checkpointer-old --b new=target/release/checkpointer \
#       --pairs 6 -- --keys 1000000 --timeout 12m
#
# Pair i runs A then B, the order swapped every other pair; each run's log and JSON, and the
# summary table, go to --out (default target/e2e-pairs/<unix seconds>). `--help` lists the
# flags; e2e_bench's own flags go after `--`. Paths are taken from the directory it is run in.
# Needs Java 17+ and Maven for the broker (scripts/install-kafka.sh), like the integration tests.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

cargo build --release --manifest-path "$root/Cargo.toml" -p integration-tests --bin e2e_bench --bin e2e_pairs

target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in
    /*) ;;
    *) target="$PWD/$target" ;;
esac
exec "$target/release/e2e_pairs" "$@"
