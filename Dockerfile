# syntax=docker/dockerfile:1
# One image with the three binaries: ingest, worker, migrations.
#
# cargo-chef derives the dependency layer from the workspace itself (every member, whatever it
# is called), so adding or renaming a crate needs no change here; a change to the project's own
# code rebuilds only the project's crates.

FROM rust:1.95-slim-bookworm AS chef
RUN cargo install --locked cargo-chef --version 0.1.78
WORKDIR /app

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# The dependencies of the three binaries, built from the recipe alone: this layer is rebuilt only
# when Cargo.toml or Cargo.lock files change.
COPY --from=planner /app/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json -p ingest -p worker -p migrations
COPY . .
RUN cargo build --release --locked -p ingest -p worker -p migrations \
 && mkdir -p /out \
 && cp target/release/ingest target/release/worker target/release/migrations /out/

FROM debian:bookworm-slim AS runtime
# ca-certificates: TLS to a managed broker or database; curl: the health checks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home clerk-sync
COPY --from=builder /out/ /usr/local/bin/
USER 10001
ENV LOG_FORMAT=json
EXPOSE 3000 3001
CMD ["ingest"]
