#!/usr/bin/env bash
# Resolves the jars of the Apache Kafka release the integration tests and the end-to-end
# benchmark run against (scripts/kafka/pom.xml) from Maven Central into a cache directory, and
# prints that directory. A no-op when the cache is complete. Needs Java 17+ and Maven.
#
#   KAFKA_LIB_DIR   where the jars go (default ~/.cache/checkpointer/kafka-<version>/lib)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/kafka"

version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' pom.xml)
lib="${KAFKA_LIB_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/checkpointer/kafka-$version/lib}"
# A stamp written last, holding the pom's checksum: a cache from an interrupted run or from an
# edited pom is resolved again.
stamp="$lib/.complete"
want=$(sha256sum pom.xml | cut -d' ' -f1)

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "$lib"
    exit 0
fi
# a directory given by KAFKA_LIB_DIR that already holds the release is used as it is, and is
# never emptied
if [[ -n "${KAFKA_LIB_DIR:-}" && -f "$lib/kafka_2.13-$version.jar" ]]; then
    echo "$lib"
    exit 0
fi

for tool in java mvn; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "install-kafka: '$tool' not found; the test broker needs Java 17+ and Maven (apt-get install openjdk-17-jre-headless maven)" >&2
        exit 1
    fi
done

echo "install-kafka: resolving Apache Kafka $version jars into $lib" >&2
# only the cache this script owns is emptied first (a stale or interrupted resolution)
if [[ -z "${KAFKA_LIB_DIR:-}" ]]; then
    rm -rf "$lib"
fi
mkdir -p "$lib"
mvn -q -B dependency:copy-dependencies -DoutputDirectory="$lib" -DincludeScope=runtime >&2
if ! compgen -G "$lib/kafka_2.13-$version.jar" >/dev/null; then
    echo "install-kafka: kafka_2.13-$version.jar missing from $lib after resolving" >&2
    exit 1
fi
echo "$want" >"$stamp"
echo "$lib"
