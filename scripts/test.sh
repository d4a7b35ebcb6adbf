#!/usr/bin/env bash
# The project's test command: formatting, lints, build, unit and integration tests.
# The integration tests start an Apache Kafka broker (KRaft, from the jars of the release pinned in
# scripts/kafka/pom.xml) and the checkpointer binary themselves.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$SECONDS
report_time() { echo "test.sh: finished in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"; }
trap report_time EXIT

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# Debian packages the tests drive: headless Chromium renders the status page
# (integration-tests/tests/web_page.rs), Prometheus scrapes the service and promtool checks the
# rules (integration-tests/tests/prometheus.rs, tests/deploy.rs), docker-compose validates the
# compose file (tests/deploy.rs); libssl-dev and pkg-config build librdkafka with TLS. Quiet, and a no-op when they are installed; the package lists
# are refreshed only when the install cannot go ahead without it.
missing=()
# Java and Maven run the test broker (scripts/install-kafka.sh); cc builds the slow-disk fault
# (integration-tests/src/fault/slow_sync.c) and links librdkafka.
for pair in chromium:chromium prometheus:prometheus promtool:prometheus docker-compose:docker-compose java:openjdk-17-jre-headless mvn:maven cc:gcc; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
# librdkafka is built with TLS against the system's OpenSSL
for pkg in libssl-dev pkg-config; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "missing Debian packages: ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "installing ${missing[*]} (apt-get)"
    install_packages() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    }
    if ! install_packages; then
        apt-get update -q >/dev/null
        install_packages
    fi
fi

# the broker's jars, resolved once and cached (a no-op when present)
bash scripts/install-kafka.sh >/dev/null

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# the code's own docs: every link in them resolves
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --document-private-items
cargo build --bin checkpointer
cargo test --workspace --no-fail-fast
