#!/usr/bin/env bash
# Smoke test of the compose stack, as a new user meets it: builds the image from the Dockerfile,
# starts docker-compose.yml, runs the README's "See it work" commands as written, and checks what
# they did. Run by .ci/run; a person can run it too (as root, or with Docker rights).
#
#   scripts/smoke-compose.sh
#
# On a machine without them it installs Debian's Docker engine (docker.io), docker-compose and
# debootstrap, starts dockerd if none runs (and stops it again at the end), and builds the local
# stand-ins of the base images where no registry is reachable (scripts/local-images.sh). The
# compose implementation is Docker Compose v2 (`docker compose`) where the machine has it, else
# docker-compose 1.29 (Debian 12's); COMPOSE names another. The first phase checks that it waits
# on `depends_on` conditions as the file needs.
#
# The stack runs as its own project (SMOKE_PROJECT, default clerk-sync-smoke), with credentials
# and published ports of its own from an env file, so it collides neither with a stack of yours
# nor with a Postgres or RabbitMQ on this machine. Built images are kept between runs; the
# containers, networks and volumes are removed whatever happens. Each phase prints its time; on a
# failure the tail of every service's log is printed and the exit status is non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

project=${SMOKE_PROJECT:-clerk-sync-smoke}
probe_project="$project-probe"
work=$(mktemp -d /tmp/clerk-sync-smoke.XXXXXX)

# Phases and their times.
phase_name=""
phase_at=$(date +%s)
run_at=$phase_at
timings=()
phase() {
  local now
  now=$(date +%s)
  if [ -n "$phase_name" ]; then
    printf -- '-- %s: %ds\n' "$phase_name" $((now - phase_at))
    timings+=("$(printf '%5ds  %s' $((now - phase_at)) "$phase_name")")
  fi
  phase_name=$1
  phase_at=$now
  if [ -n "$phase_name" ]; then printf '\n== %s\n' "$phase_name"; fi
}
fail() {
  echo "FAILED ($phase_name): $*" >&2
  exit 1
}

# --- What a fresh machine lacks ----------------------------------------------------------------

apt_updated=false
apt_install() {
  if [ "$apt_updated" = false ]; then
    apt-get update -qq
    apt_updated=true
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

started_dockerd=""
stack_up=false
probe_up=false

compose_cmd=()
# `command`: never the README's `docker` function below.
compose() { command "${compose_cmd[@]}" -p "$project" --env-file "$work/smoke.env" "$@"; }
probe() { (cd "$work/probe" && command "${compose_cmd[@]}" -p "$probe_project" "$@"); }

cleanup() {
  local status=$?
  set +e
  if [ "$status" -ne 0 ] && [ "$stack_up" = true ]; then
    echo
    echo "== logs of every service (tail)"
    compose ps
    compose logs --no-color --tail=40
  fi
  if [ "$probe_up" = true ]; then
    probe down -v --remove-orphans -t 0 >/dev/null 2>&1
  fi
  if [ "$stack_up" = true ]; then
    compose down -v --remove-orphans -t 10 >/dev/null 2>&1
  fi
  # Whatever compose left of either project (it should be nothing).
  for p in "$project" "$probe_project"; do
    for kind in container volume network; do
      if [ "$kind" = container ]; then
        mapfile -t ids < <(command docker ps -aq --filter "label=com.docker.compose.project=$p")
      else
        mapfile -t ids < <(command docker "$kind" ls -q --filter "label=com.docker.compose.project=$p")
      fi
      if [ "${#ids[@]}" -gt 0 ]; then
        echo "removing leftover ${kind}s of $p"
        if [ "$kind" = container ]; then
          command docker rm -f -v "${ids[@]}" >/dev/null
        else
          command docker "$kind" rm "${ids[@]}" >/dev/null
        fi
      fi
    done
  done
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null
    wait "$started_dockerd" 2>/dev/null
  fi
  rm -rf "$work"
  if [ -n "$phase_name" ]; then phase ""; fi
  echo
  echo "== times"
  printf '%s\n' "${timings[@]}"
  printf '%5ds  total\n' $(($(date +%s) - run_at))
  if [ "$status" -eq 0 ]; then echo "smoke test passed"; else echo "smoke test FAILED" >&2; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 143' INT TERM

phase "tools"
if ! command -v dockerd >/dev/null; then apt_install docker.io; fi
if ! command -v docker >/dev/null; then apt_install docker.io; fi
if ! command -v debootstrap >/dev/null; then apt_install debootstrap; fi
if ! command -v curl >/dev/null; then apt_install curl; fi
if ! command -v ss >/dev/null; then apt_install iproute2; fi
if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd"
  dockerd >"$work/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 1 60); do
    if docker info >/dev/null 2>&1; then break; fi
    sleep 1
  done
  docker info >/dev/null 2>&1 || { tail -n 20 "$work/dockerd.log"; fail "dockerd did not start"; }
fi
if [ -n "${COMPOSE:-}" ]; then
  read -r -a compose_cmd <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
else
  if ! command -v docker-compose >/dev/null; then apt_install docker-compose; fi
  compose_cmd=(docker-compose)
fi
echo "engine: Docker $(docker version --format '{{.Server.Version}}')"
echo "compose: ${compose_cmd[*]} ($("${compose_cmd[@]}" version --short 2>/dev/null || "${compose_cmd[@]}" version | head -n 1))"

phase "base images"
bash scripts/local-images.sh

# --- The compose implementation waits as the file needs ----------------------------------------

phase "compose honours depends_on, health checks, named volumes and .env"
mkdir -p "$work/probe"
cat >"$work/probe/docker-compose.yml" <<'EOF'
services:
  slow:
    image: debian:bookworm-slim
    init: true
    command: ["sh", "-c", "sleep ${PROBE_HEALTHY_AFTER}; touch /tmp/healthy; exec sleep 600"]
    healthcheck:
      test: ["CMD", "test", "-f", "/tmp/healthy"]
      interval: 1s
      timeout: 2s
      retries: 60
  once:
    image: debian:bookworm-slim
    command: ["sh", "-c", "sleep 2; echo written-by-once > /marks/once; exit ${PROBE_ONCE_EXIT}"]
    volumes: ["marks:/marks"]
  after:
    image: debian:bookworm-slim
    init: true
    command: ["sh", "-c", "cat /marks/once; exec sleep 600"]
    volumes: ["marks:/marks"]
    depends_on:
      slow:
        condition: service_healthy
      once:
        condition: service_completed_successfully
volumes:
  marks:
EOF
printf 'PROBE_HEALTHY_AFTER=5\nPROBE_ONCE_EXIT=0\n' >"$work/probe/.env"
container_of() { docker ps -aq --filter "label=com.docker.compose.project=$1" \
  --filter "label=com.docker.compose.service=$2" | head -n 1; }
nanos() { date -d "$1" +%s%N; }
probe_up=true
probe up -d >"$work/probe.log" 2>&1 || { cat "$work/probe.log"; fail "the probe project did not start"; }
slow=$(container_of "$probe_project" slow)
once=$(container_of "$probe_project" once)
after=$(container_of "$probe_project" after)
slow_started=$(nanos "$(docker inspect -f '{{.State.StartedAt}}' "$slow")")
once_finished=$(nanos "$(docker inspect -f '{{.State.FinishedAt}}' "$once")")
after_started=$(nanos "$(docker inspect -f '{{.State.StartedAt}}' "$after")")
waited_ms=$(((after_started - slow_started) / 1000000))
echo "after started ${waited_ms} ms after slow, which turns healthy after 5 s (from .env)"
[ "$waited_ms" -ge 5000 ] || fail "compose did not wait for service_healthy"
[ "$after_started" -ge "$once_finished" ] || fail "compose did not wait for service_completed_successfully"
sleep 1
docker logs "$after" 2>&1 | grep -qx written-by-once || fail "the named volume did not carry once's file to after"
echo "after read what once wrote in the named volume"
probe down -v -t 0 >/dev/null 2>&1
if PROBE_ONCE_EXIT=3 probe up -d >"$work/probe.log" 2>&1; then
  fail "compose started the stack although a service_completed_successfully dependency failed"
fi
after=$(container_of "$probe_project" after)
if [ -n "$after" ] && [ "$(docker inspect -f '{{.State.StartedAt}}' "$after")" != "0001-01-01T00:00:00Z" ]; then
  fail "compose started a service whose service_completed_successfully dependency exited 3"
fi
echo "with the one-shot dependency exiting 3, compose failed and never started the dependent"
probe down -v -t 0 >/dev/null 2>&1
probe_up=false

# --- The stack ---------------------------------------------------------------------------------

free_port() {
  local port
  for port in $(shuf -i 20000-29999 -n 100); do
    if ! ss -Htln "sport = :$port" | grep -q .; then
      echo "$port"
      return 0
    fi
  done
  return 1
}
ingest_port=$(free_port)
management_port=$(free_port)
[ "$ingest_port" != "$management_port" ] || management_port=$(free_port)
rabbit_user=smoke
rabbit_pass="smoke-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
# The variables a user sets in .env, here in a file of the test's own.
cat >"$work/smoke.env" <<EOF
POSTGRES_PASSWORD=smoke-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
RABBITMQ_DEFAULT_USER=$rabbit_user
RABBITMQ_DEFAULT_PASS=$rabbit_pass
INGEST_PUBLISH_PORT=$ingest_port
RABBITMQ_MANAGEMENT_PORT=$management_port
EOF
echo "project $project: ingest on 127.0.0.1:$ingest_port, management on 127.0.0.1:$management_port"

phase "build the image"
stack_up=true
# docker-compose 1.x builds with the classic builder: --force-rm leaves no container of a failed
# step behind. BuildKit (Compose v2) leaves none anyway.
build_flags=()
if [ "${compose_cmd[0]}" = docker-compose ]; then build_flags=(--force-rm); fi
# The builder's output goes to a file: each step is summed up in one line ("[cached]" when the
# layer was reused), with cargo's closing lines; on a failure its tail is printed.
summarise_build() { # log file
  sed 's/\x1b\[[0-9;]*m//g' "$1" | awk '
    function flush_step() { if (step != "") { out = out step "\n"; step = "" } }
    function flush_block() {
      flush_step()
      if (name != "" && steps > 0 && cached == steps - stages) {
        print name ": all " steps " steps cached"
      } else if (name != "" || out != "") {
        if (name != "") print name
        printf "%s", out
      }
      name = ""; out = ""; steps = 0; cached = 0; stages = 0
    }
    /^Building [a-z0-9_-]+$/ { flush_block(); name = $0; next }
    /^Step [0-9]+\/[0-9]+ :/ {
      flush_step(); steps++; step = "  " substr($0, 1, 100)
      if ($4 == "FROM") stages++
      next
    }
    / ---> Using cache/ { step = step "  [cached]"; cached++; next }
    /Finished `release`|Installed package|Successfully tagged/ {
      flush_step(); out = out "  " $0 "\n"; next
    }
    /^(Creating|Starting|Recreating) / { flush_block(); print "  " $0; next }
    END { flush_block() }'
}
if ! compose build "${build_flags[@]}" >"$work/build.log" 2>&1; then
  sed 's/\x1b\[[0-9;]*m//g' "$work/build.log" | grep -v -e '^ ---> ' -e '^Removing intermediate' | tail -n 40
  fail "the image did not build"
fi
summarise_build "$work/build.log"

phase "up -d --build"
if ! compose up -d --build >"$work/up.log" 2>&1; then
  sed 's/\x1b\[[0-9;]*m//g' "$work/up.log" | tail -n 40
  fail "up -d --build failed"
fi
summarise_build "$work/up.log"

phase "wait until every service is healthy"
service_state() { # service -> health or state, and the exit code of a stopped one
  local id
  id=$(container_of "$project" "$1")
  [ -n "$id" ] || { echo missing; return; }
  docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}} {{.State.ExitCode}}' "$id"
}
deadline=$(($(date +%s) + 300))
while :; do
  states=""
  all=true
  for service in postgres rabbitmq migrations ingest worker; do
    state=$(service_state "$service")
    states+="$service=${state% *} "
    case "$service:$state" in
      migrations:"exited 0") ;;
      migrations:exited*) fail "migrations exited with status ${state#* }" ;;
      *:"healthy "*) ;;
      *:"unhealthy "*) fail "$service is unhealthy" ;;
      *) all=false ;;
    esac
  done
  if [ "$all" = true ]; then break; fi
  [ "$(date +%s)" -lt "$deadline" ] || fail "not healthy within 300 s: $states"
  sleep 2
done
echo "$states"
# The order compose kept: the worker started only after the migrations finished.
migrations_finished=$(nanos "$(docker inspect -f '{{.State.FinishedAt}}' "$(container_of "$project" migrations)")")
worker_started=$(nanos "$(docker inspect -f '{{.State.StartedAt}}' "$(container_of "$project" worker)")")
[ "$worker_started" -ge "$migrations_finished" ] || fail "the worker started before the migrations finished"
echo "the worker started $(((worker_started - migrations_finished) / 1000000)) ms after the migrations finished"

phase "README: See it work"
# The commands exactly as README.md gives them; `docker compose` is this project's compose (and
# `exec` gets -T: no terminal here).
mapfile -t readme < <(awk '/^## See it work/ { f = 1; next } f && /^## / { exit }
  f && /^```sh/ { c = 1; next } f && c && /^```/ { c = 0; next } f && c { print }' README.md)
[ "${#readme[@]}" -eq 2 ] || fail "expected the two commands of README's \"See it work\", found ${#readme[@]}"
case "${readme[0]}" in *"send-example user.created"*) ;; *) fail "unexpected first command: ${readme[0]}" ;; esac
case "${readme[1]}" in *psql*) ;; *) fail "unexpected second command: ${readme[1]}" ;; esac
# shellcheck disable=SC2317 # called by the README's commands, through eval
docker() {
  if [ "${1:-}" = compose ]; then
    shift
    if [ "${1:-}" = exec ]; then
      shift
      compose exec -T "$@"
    else
      compose "$@"
    fi
  else
    command docker "$@"
  fi
}
echo "\$ ${readme[0]}"
sent=$(eval "${readme[0]}") || { echo "$sent"; fail "send-example failed"; }
echo "$sent"
grep -q '^200 ' <<<"$sent" || fail "the ingest did not answer 200"
user_id=$(awk '$1 == "svix-id" { print $4 }' <<<"$sent")
[ -n "$user_id" ] || fail "send-example printed no user id"
select_until() { # grep-mode (present|absent) -> prints the last output
  local out
  for _ in $(seq 1 30); do
    out=$(eval "${readme[1]}")
    if [ "$1" = present ] && grep -q "$user_id" <<<"$out"; then break; fi
    if [ "$1" = absent ] && ! grep -q "$user_id" <<<"$out"; then break; fi
    sleep 1
  done
  echo "$out"
}
echo "\$ ${readme[1]}"
out=$(select_until present)
echo "$out"
row=$(grep "$user_id" <<<"$out") || fail "no row for $user_id"
email=$(tr '[:upper:]' '[:lower:]' <<<"$user_id")@example.org
grep -q "$email" <<<"$row" || fail "the row of $user_id does not hold $email"
grep -q "| client " <<<"$row" || fail "the row of $user_id does not have the default role"

phase "delete that user"
delete_command="docker compose exec ingest ingest send-example user.deleted --user-id $user_id --url http://localhost:3000/api/webhooks"
echo "\$ $delete_command"
eval "$delete_command"
out=$(select_until absent)
echo "$out"
if grep -q "$user_id" <<<"$out"; then fail "the row of $user_id is still there"; fi
unset -f docker

phase "metrics"
ingest_metrics=$(curl -fsS "http://127.0.0.1:$ingest_port/metrics") || fail "the ingest's /metrics did not answer on 127.0.0.1:$ingest_port"
grep '^clerk_sync_ingest_requests_total{outcome="accepted"}' <<<"$ingest_metrics"
accepted=$(awk '/^clerk_sync_ingest_requests_total\{outcome="accepted"\}/ { s += $NF } END { print s + 0 }' <<<"$ingest_metrics")
[ "$accepted" -ge 2 ] || fail "the ingest's /metrics counts $accepted accepted requests, expected 2"
worker_metrics=$(compose exec -T worker curl -fsS http://127.0.0.1:3001/metrics) || fail "the worker's /metrics did not answer"
grep '^clerk_sync_worker_events_total' <<<"$worker_metrics"
applied=$(awk '/^clerk_sync_worker_events_total/ && /outcome="applied"/ { s += $NF } END { print s + 0 }' <<<"$worker_metrics")
[ "$applied" -ge 2 ] || fail "the worker's /metrics counts $applied applied events, expected 2"

phase "published on 127.0.0.1 only"
ingest_id=$(container_of "$project" ingest)
published=$(command docker port "$ingest_id" 3000/tcp)
echo "ingest 3000/tcp -> $published"
[ "$published" = "127.0.0.1:$ingest_port" ] || fail "the ingest is published on $published, not 127.0.0.1:$ingest_port only"
listeners=$(ss -Htln "sport = :$ingest_port" | awk '{ print $4 }' | sort -u)
echo "listening: $(tr '\n' ' ' <<<"$listeners")"
if grep -v '^127\.0\.0\.1:' <<<"$listeners" | grep -q .; then fail "port $ingest_port listens beyond 127.0.0.1"; fi
management=$(curl -fsS -u "$rabbit_user:$rabbit_pass" "http://127.0.0.1:$management_port/api/whoami") \
  || fail "the management API did not accept RABBITMQ_DEFAULT_USER on 127.0.0.1:$management_port"
echo "management API, as the user from the env file: $management"

phase "worker doctor"
doctor=$(compose exec -T worker worker doctor) || { echo "$doctor"; fail "worker doctor failed inside the stack"; }
echo "$doctor"
for line in '^ok +database ' '^ok +broker ' '^ok +topology ' '^ok +consumers ' '^ok +last event ' \
  '^warn +webhook secret '; do
  grep -Eq "$line" <<<"$doctor" || fail "worker doctor: no line matching /$line/"
done
compose exec -T worker worker doctor --json | grep -q '"ok":true' || fail "worker doctor --json is not ok"

phase "the image holds the binaries the Kubernetes manifests call"
image=$(docker inspect -f '{{.Config.Image}}' "$ingest_id")
for binary in ingest worker migrations; do
  docker run --rm "$image" "$binary" --help >"$work/help.txt" 2>&1 || { cat "$work/help.txt"; fail "$binary --help failed"; }
  echo "$binary --help: $(head -n 1 "$work/help.txt")"
done
echo "image $image: $(docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec), user $(docker image inspect -f '{{.Config.User}}' "$image")"
[ "$(docker image inspect -f '{{.Config.User}}' "$image")" != "" ] || fail "the image runs as root"

phase "down -v"
compose down -v --remove-orphans -t 10
stack_up=false
left=$(docker ps -aq --filter "label=com.docker.compose.project=$project"; docker volume ls -q --filter "label=com.docker.compose.project=$project"; docker network ls -q --filter "label=com.docker.compose.project=$project")
[ -z "$left" ] || fail "down -v left: $left"
