# syntax=docker/dockerfile:1
# checkpointer container image: built with cargo, run as a non-root user with its checkpoint
# store on a volume. Build: docker build -t checkpointer .
# Stop grace period: `docker stop` waits 10 s by default, less than the final checkpoint may
# need (checkpoint.shutdown_timeout, 30 s by default): run with --stop-timeout 60, or
# stop_grace_period: 60s in compose (docker-compose.yml does).

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

# --- toolchain with cargo-chef, which turns the manifests into a cacheable dependency layer
FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS chef
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake pkg-config zlib1g-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# --- dependencies first (rebuilt only when Cargo.toml/Cargo.lock change), then the source
FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# the allocator's built-in options (docs/operations.md, memory): the dependency layer builds
# jemalloc with them
COPY .cargo .cargo
RUN cargo chef cook --release --locked --package checkpointer --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --package checkpointer --bin checkpointer \
    && cp target/release/checkpointer /usr/local/bin/checkpointer

# --- slim runtime
FROM debian:${DEBIAN}-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 checkpointer \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/checkpointer --no-create-home checkpointer \
    && mkdir -p /var/lib/checkpointer \
    && chown checkpointer:checkpointer /var/lib/checkpointer
COPY --from=builder /usr/local/bin/checkpointer /usr/local/bin/checkpointer
# the configuration is baked in (config/container.yaml: store on the volume, HTTP on
# 0.0.0.0:9180, JSON logs); CHECKPOINTER_<SECTION>__<KEY> variables override any key, and a
# mounted file named by CHECKPOINTER_CONFIG or --config replaces it
COPY config/ /etc/checkpointer/
ENV CHECKPOINTER_CONFIG=/etc/checkpointer/container.yaml
USER 10001:10001
WORKDIR /var/lib/checkpointer
VOLUME ["/var/lib/checkpointer"]
EXPOSE 9180
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["checkpointer", "probe"]
ENTRYPOINT ["checkpointer"]
CMD ["run"]
