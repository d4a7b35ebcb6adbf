#!/usr/bin/env bash
# The project's test command: formatting, lints, build, unit and integration tests.
# The integration tests start a tansu broker and the checkpointer binary themselves.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/install-tansu.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --bin checkpointer
cargo test --workspace --no-fail-fast
