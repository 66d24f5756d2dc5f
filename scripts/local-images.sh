#!/usr/bin/env bash
# Builds local stand-ins for the base images that the Dockerfile and docker-compose.yml name, for a
# machine that reaches Debian's package archive but no image registry. Each is tagged exactly as
# those files name it, so `docker compose up --build` then finds it and pulls nothing. With Docker
# Hub at hand you need none of this: the official images are the reference.
#
#   scripts/local-images.sh           build the stand-ins that are missing
#   scripts/local-images.sh --force   build all four again
#
# Needs: docker (any engine with the Docker CLI), debootstrap, and for the rust image a Rust
# toolchain of the tag's version on this machine (rustc on PATH). DEBIAN_MIRROR, when set, is the
# archive debootstrap and apt use; otherwise debootstrap's default.
#
# What each stand-in reproduces of the official image (only what the compose file and the
# Dockerfile rely on):
#   debian:bookworm-slim   a minimal Debian 12 (debootstrap --variant=minbase) with apt working,
#                          no service started by package scripts (policy-rc.d), apt keeping no
#                          package files or caches in the image (docker-clean), no documentation,
#                          manual pages or translations installed (slim), CMD bash. It also
#                          holds the certificate authorities this machine adds to Debian's
#                          (/usr/local/share/ca-certificates), which installing ca-certificates
#                          then trusts: where this machine reaches the crate registry through a
#                          TLS proxy, cargo inside the build does too.
#   rust:<v>-slim-bookworm debian:bookworm-slim plus gcc, libc6-dev and ca-certificates, and the
#                          Rust toolchain of this machine (rustc, cargo, std; version checked
#                          against the tag) under RUSTUP_HOME=/usr/local/rustup, cargo on PATH from
#                          CARGO_HOME=/usr/local/cargo (so `cargo install` puts tools on PATH).
#                          No rustup: the image holds one toolchain.
#   postgres:17            PostgreSQL 17 from Debian 13 (trixie); PGDATA=/var/lib/postgresql/data
#                          (a volume); on an empty data directory, initdb with POSTGRES_USER
#                          (default postgres) and POSTGRES_PASSWORD (required unless
#                          POSTGRES_HOST_AUTH_METHOD=trust), creates POSTGRES_DB (default: the
#                          user), runs /docker-entrypoint-initdb.d/*.sql and *.sh; trust on the
#                          local socket, POSTGRES_HOST_AUTH_METHOD (default scram-sha-256) over TCP
#                          from anywhere; listens on *:5432; runs as the postgres user; psql and
#                          pg_isready on PATH; stops on SIGINT (fast shutdown).
#   rabbitmq:4-management  RabbitMQ 4 from Debian 13 (trixie), node rabbit@<hostname>, data in
#                          /var/lib/rabbitmq (a volume); RABBITMQ_DEFAULT_USER/RABBITMQ_DEFAULT_PASS
#                          (default guest/guest) as the administrator created on first start; the
#                          management plugin on 15672 and the Prometheus plugin on 15692; AMQP on
#                          5672; logs on standard output; rabbitmq-diagnostics and rabbitmqctl work
#                          from `exec` (HOME=/var/lib/rabbitmq, the node's Erlang cookie); runs as
#                          the rabbitmq user.
set -euo pipefail
cd "$(dirname "$0")/.."

force=false
case "${1:-}" in
  --force) force=true ;;
  "") ;;
  *) echo "usage: $0 [--force]" >&2; exit 2 ;;
esac

log() { printf '%s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# The names, read from the files that use them, so that a change there cannot go unnoticed here.
rust_image=$(awk 'toupper($1) == "FROM" && $2 ~ /^rust:/ { print $2; exit }' Dockerfile)
runtime_image=$(awk 'toupper($1) == "FROM" && $2 ~ /^debian:/ { print $2; exit }' Dockerfile)
postgres_image=$(awk '$1 == "image:" && $2 ~ /^postgres:/ { print $2; exit }' docker-compose.yml)
rabbitmq_image=$(awk '$1 == "image:" && $2 ~ /^rabbitmq:/ { print $2; exit }' docker-compose.yml)
for pair in "rust:$rust_image" "debian:$runtime_image" "postgres:$postgres_image" \
  "rabbitmq:$rabbitmq_image"; do
  if [ "${pair#*:}" = "" ]; then
    echo "no ${pair%%:*} image named in Dockerfile or docker-compose.yml" >&2
    exit 1
  fi
done
# Any other base image named there has no stand-in: say so rather than let the build try a pull.
unknown=$( (awk 'toupper($1) == "FROM" { print $2 }' Dockerfile;
  awk '$1 == "image:" { print $2 }' docker-compose.yml) |
  grep -v -x -e "$rust_image" -e "$runtime_image" -e "$postgres_image" -e "$rabbitmq_image" \
    -e 'clerk-sync:.*' || true)
# Stages of the Dockerfile itself (FROM chef AS …) are not images.
stages=$(awk 'toupper($1) == "FROM" && toupper($3) == "AS" { print $4 }' Dockerfile)
for name in $unknown; do
  if ! grep -qx "$name" <<<"$stages"; then
    echo "$name is named in Dockerfile or docker-compose.yml but has no stand-in here" >&2
    exit 1
  fi
done

case "$runtime_image" in
  debian:bookworm*) ;;
  *) echo "$runtime_image: this script makes Debian 12 (bookworm) images only" >&2; exit 1 ;;
esac
case "$rust_image" in
  *-bookworm) ;;
  *) echo "$rust_image: this script makes Rust images on Debian 12 (bookworm) only" >&2; exit 1 ;;
esac

have() { docker image inspect "$1" >/dev/null 2>&1; }

work=$(mktemp -d /var/tmp/clerk-sync-images.XXXXXX)
trap 'rm -rf "$work"' EXIT

# A minimal Debian root file system as a tar, made once per suite per run.
rootfs() { # suite -> path of the tar
  local suite=$1 dir="$work/rootfs-$1"
  if [ ! -f "$dir.tar" ]; then
    log "debootstrap $suite (about a minute)" >&2
    # shellcheck disable=SC2086 # the mirror is one word or none
    debootstrap --variant=minbase "$suite" "$dir" ${DEBIAN_MIRROR:-} >"$work/debootstrap-$suite.log" 2>&1 \
      || { tail -n 20 "$work/debootstrap-$suite.log" >&2; return 1; }
    # As in Docker's Debian images: package scripts start no service inside a container, apt
    # keeps no downloaded package nor cache, and (the "slim" part) dpkg installs no
    # documentation, manual pages or translations.
    printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"
    chmod 755 "$dir/usr/sbin/policy-rc.d"
    clean='rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true'
    printf '%s\n' "DPkg::Post-Invoke { \"$clean\"; };" "APT::Update::Post-Invoke { \"$clean\"; };" \
      'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' 'Acquire::Languages "none";' \
      >"$dir/etc/apt/apt.conf.d/docker-clean"
    mkdir -p "$dir/etc/dpkg/dpkg.cfg.d"
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
      'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
      'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/lintian/*' \
      >"$dir/etc/dpkg/dpkg.cfg.d/docker"
    find "$dir/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    rm -rf "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/locale/*
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin "$dir"/var/lib/apt/lists/*
    tar --numeric-owner -C "$dir" -cf "$dir.tar" .
    rm -rf "$dir"
  fi
  echo "$dir.tar"
}

build() { # tag context-dir
  log "docker build $1"
  if ! docker build --force-rm --tag "$1" "$2" >"$work/build.log" 2>&1; then
    tail -n 30 "$work/build.log" >&2
    echo "building $1 failed" >&2
    return 1
  fi
}

# debian:bookworm-slim
if $force || ! have "$runtime_image"; then
  ctx="$work/debian"
  mkdir -p "$ctx"
  mv "$(rootfs bookworm)" "$ctx/rootfs.tar"
  # The certificate authorities this machine adds to Debian's: where TLS goes through a proxy of
  # the machine's, cargo and apt inside a build then trust what they trust outside.
  mkdir -p "$ctx/local-ca"
  if [ -d /usr/local/share/ca-certificates ]; then
    find /usr/local/share/ca-certificates -name '*.crt' -exec cp {} "$ctx/local-ca/" \;
  fi
  cat >"$ctx/Dockerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
COPY local-ca/ /usr/local/share/ca-certificates/
ENV LANG=C.UTF-8
CMD ["bash"]
EOF
  build "$runtime_image" "$ctx"
  rm -rf "$ctx"
else
  log "$runtime_image is there"
fi

# rust:<version>-slim-bookworm, on the image above.
if $force || ! have "$rust_image"; then
  wanted=${rust_image#rust:}
  wanted=${wanted%%-*}
  sysroot=$(rustc --print sysroot)
  have_version=$(rustc --version | awk '{ print $2 }')
  case "$have_version" in
    "$wanted" | "$wanted".*) ;;
    *)
      echo "$rust_image needs Rust $wanted on this machine; rustc is $have_version" >&2
      exit 1
      ;;
  esac
  ctx="$work/rust"
  mkdir -p "$ctx/toolchain"
  log "copying the Rust $have_version toolchain from $sysroot"
  # Documentation and the debuggers' scripts stay out.
  tar -C "$sysroot" --exclude=./share/doc --exclude=./share/man -cf - . | tar -C "$ctx/toolchain" -xf -
  cat >"$ctx/Dockerfile" <<EOF
FROM $runtime_image
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:\$PATH RUST_VERSION=$have_version
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates gcc libc6-dev \\
 && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rustup/toolchains/$have_version-x86_64-unknown-linux-gnu
RUN mkdir -p /usr/local/cargo/bin \\
 && for tool in /usr/local/rustup/toolchains/*/bin/*; do ln -s "\$tool" /usr/local/cargo/bin/; done \\
 && chmod -R a+w /usr/local/cargo \\
 && cargo --version && rustc --version
EOF
  build "$rust_image" "$ctx"
  rm -rf "$ctx"
else
  log "$rust_image is there"
fi

# postgres:17, from Debian 13, which packages PostgreSQL 17.
if $force || ! have "$postgres_image"; then
  major=${postgres_image#postgres:}
  major=${major%%[.-]*}
  ctx="$work/postgres"
  mkdir -p "$ctx"
  cp "$(rootfs trixie)" "$ctx/rootfs.tar"
  cat >"$ctx/Dockerfile" <<EOF
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8 PG_MAJOR=$major
# No cluster of Debian's own: the entry point makes one in PGDATA.
RUN mkdir -p /etc/postgresql-common/createcluster.d \\
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/docker.conf \\
 && apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-$major \\
 && rm -rf /var/lib/apt/lists/* \\
 && mkdir -p /var/run/postgresql && chown postgres:postgres /var/run/postgresql \\
 && chmod 3777 /var/run/postgresql
ENV PATH=\$PATH:/usr/lib/postgresql/$major/bin PGDATA=/var/lib/postgresql/data
RUN mkdir -p /docker-entrypoint-initdb.d "\$PGDATA" && chown postgres:postgres "\$PGDATA" \\
 && chmod 1777 "\$PGDATA"
VOLUME /var/lib/postgresql/data
COPY docker-entrypoint.sh /usr/local/bin/
ENTRYPOINT ["docker-entrypoint.sh"]
STOPSIGNAL SIGINT
EXPOSE 5432
CMD ["postgres"]
EOF
  cat >"$ctx/docker-entrypoint.sh" <<'EOF'
#!/usr/bin/env bash
# The official postgres image's entry point, reduced to what it does on first start.
set -Eeo pipefail
if [ "${1:0:1}" = '-' ]; then set -- postgres "$@"; fi
if [ "$1" = postgres ] && [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi
if [ "$1" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_USER:=postgres}"
  : "${POSTGRES_DB:=$POSTGRES_USER}"
  if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
    echo 'Error: Database is uninitialized and superuser password is not specified.' >&2
    echo '       Set POSTGRES_PASSWORD (or POSTGRES_HOST_AUTH_METHOD=trust).' >&2
    exit 1
  fi
  # shellcheck disable=SC2086 # arguments for initdb, as the official image takes them
  initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "${POSTGRES_PASSWORD:-}") \
    ${POSTGRES_INITDB_ARGS:-}
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  printf '\nhost all all all %s\n' "${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >>"$PGDATA/pg_hba.conf"
  # A server for the set-up only, on a private socket: pg_isready does not see it, so a health
  # check cannot pass before the database exists.
  setup_socket=$(mktemp -d)
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=$setup_socket" -w start
  export PGHOST=$setup_socket PGUSER=$POSTGRES_USER
  if [ "$POSTGRES_DB" != postgres ]; then
    psql -v ON_ERROR_STOP=1 --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh) echo "running $f"; bash "$f" ;;
      *.sql) echo "running $f"; psql -v ON_ERROR_STOP=1 --dbname "$POSTGRES_DB" -f "$f" ;;
      *) ;;
    esac
  done
  pg_ctl -D "$PGDATA" -m fast -w stop
  unset PGHOST PGUSER
  rmdir "$setup_socket"
  echo 'PostgreSQL init process complete; ready for start up.'
fi
exec "$@"
EOF
  chmod 755 "$ctx/docker-entrypoint.sh"
  build "$postgres_image" "$ctx"
  rm -rf "$ctx"
else
  log "$postgres_image is there"
fi

# rabbitmq:4-management, from Debian 13, which packages RabbitMQ 4.
if $force || ! have "$rabbitmq_image"; then
  ctx="$work/rabbitmq"
  mkdir -p "$ctx"
  cp "$(rootfs trixie)" "$ctx/rootfs.tar"
  cat >"$ctx/Dockerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /etc/rabbitmq/conf.d \
 && rabbitmq-plugins enable --offline rabbitmq_management rabbitmq_prometheus \
 && printf '%s\n' 'loopback_users.guest = false' 'listeners.tcp.default = 5672' \
      'management.tcp.port = 15672' 'log.console = true' 'log.console.level = info' \
      'log.file = false' > /etc/rabbitmq/conf.d/10-defaults.conf \
 && rm -f /var/lib/rabbitmq/.erlang.cookie \
 && chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /etc/rabbitmq
# The CLI tools of any user find the node's cookie.
ENV HOME=/var/lib/rabbitmq RABBITMQ_LOGS=-
VOLUME /var/lib/rabbitmq
COPY docker-entrypoint.sh /usr/local/bin/
ENTRYPOINT ["docker-entrypoint.sh"]
EXPOSE 5672 15672 15692
CMD ["rabbitmq-server"]
EOF
  cat >"$ctx/docker-entrypoint.sh" <<'EOF'
#!/usr/bin/env bash
# The default user from RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS, as the official image
# takes them, then the server as the rabbitmq user.
set -Eeo pipefail
if [ "$1" = rabbitmq-server ] && [ "$(id -u)" = 0 ]; then
  conf=/etc/rabbitmq/conf.d/20-default-user.conf
  : >"$conf"
  if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then echo "default_user = $RABBITMQ_DEFAULT_USER" >>"$conf"; fi
  if [ -n "${RABBITMQ_DEFAULT_PASS:-}" ]; then echo "default_pass = $RABBITMQ_DEFAULT_PASS" >>"$conf"; fi
  chown rabbitmq:rabbitmq "$conf"
  chmod 600 "$conf"
  chown -R rabbitmq:rabbitmq /var/lib/rabbitmq
  exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups /usr/lib/rabbitmq/bin/rabbitmq-server
fi
exec "$@"
EOF
  chmod 755 "$ctx/docker-entrypoint.sh"
  build "$rabbitmq_image" "$ctx"
  rm -rf "$ctx"
else
  log "$rabbitmq_image is there"
fi

for image in "$runtime_image" "$rust_image" "$postgres_image" "$rabbitmq_image"; do
  printf '%s  %s\n' "$image" "$(docker image inspect --format '{{.Size}}' "$image" | numfmt --to=iec)"
done
