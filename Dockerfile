# syntax=docker/dockerfile:1
# One image with the three binaries: ingest, worker, migrations.

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /app

# Dependency layer: build every dependency against empty sources, so that a change to the
# project's own code rebuilds only the project's crates.
COPY Cargo.toml Cargo.lock ./
COPY shared/Cargo.toml shared/
COPY ingest/Cargo.toml ingest/
COPY worker/Cargo.toml worker/
COPY migrations/Cargo.toml migrations/
COPY dlq/Cargo.toml dlq/
COPY fault-suite/Cargo.toml fault-suite/
RUN for crate in shared ingest worker migrations dlq fault-suite; do \
      mkdir -p "$crate/src" && echo 'fn main() {}' > "$crate/src/main.rs" && touch "$crate/src/lib.rs"; \
    done \
 && cargo build --release --locked -p ingest -p worker -p migrations \
 && rm -rf shared/src ingest/src worker/src migrations/src dlq/src fault-suite/src

COPY . .
# COPY keeps the files' own times, which may be older than the placeholders above: touch them so
# cargo rebuilds the project's crates.
RUN find shared ingest worker migrations dlq -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p ingest -p worker -p migrations \
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
