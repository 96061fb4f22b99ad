# shellcheck shell=bash
# Shared helpers for deploy/local/{up,down,status}.sh. Sourced, never run.
#
# The local stack is three of our own server processes (Redis, PostgreSQL,
# Kafka in KRaft mode) bound to 127.0.0.1, with all state under the git-ignored
# folder <repo>/.local/. We never use systemctl/service/pg_ctlcluster and never
# kill by process name: every process is found through its pid file, so the
# scripts cannot touch a system-wide Redis/PostgreSQL or someone else's Java.

# --- locations ---------------------------------------------------------------
# Repo root = two directories above deploy/local, wherever the clone lives.
TALLY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
# TALLY_LOCAL_DIR moves all state (data, pid files, logs, the lock) elsewhere, so a
# second, isolated stack can run next to the default one on other ports; the
# fault-injection suite (deploy/faults.sh) uses it to restart its own servers
# without touching the shared stack. Unset, it is <repo>/.local as always.
LOCAL_DIR="${TALLY_LOCAL_DIR:-$TALLY_ROOT/.local}"

REDIS_PORT="${TALLY_REDIS_PORT:-6379}"
PG_PORT="${TALLY_PG_PORT:-5432}"
KAFKA_PORT="${TALLY_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${TALLY_KAFKA_CONTROLLER_PORT:-9093}"

REDIS_DIR="$LOCAL_DIR/redis"
REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"

PG_DIR="$LOCAL_DIR/postgres"
PG_DATA="$PG_DIR/data"
PG_PID="$PG_DATA/postmaster.pid" # written and removed by PostgreSQL itself
PG_LOG="$PG_DIR/postgres.log"

KAFKA_VERSION="4.4.0"
KAFKA_DIR="$LOCAL_DIR/kafka"
# TALLY_KAFKA_LIBS lets a second stack reuse the jars of the first instead of
# fetching its own copy from Maven Central.
KAFKA_LIBS="${TALLY_KAFKA_LIBS:-$KAFKA_DIR/libs}"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
KAFKA_LOG="$KAFKA_DIR/kafka.log"
KAFKA_OUT="$KAFKA_DIR/kafka.out"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
KAFKA_LOG4J="$KAFKA_DIR/log4j2.properties"
KAFKA_POM="$TALLY_ROOT/deploy/kafka-pom.xml"

ALL_SERVICES=(redis postgres kafka)

# --- small utilities ---------------------------------------------------------
log() { printf '%s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Parse service names from the command line into the global array SERVICES
# (default: all). Unknown names are an error, so typos don't silently no-op.
parse_services() {
  SERVICES=()
  local s
  for s in "$@"; do
    case "$s" in
      redis | postgres | kafka) SERVICES+=("$s") ;;
      all) SERVICES+=("${ALL_SERVICES[@]}") ;;
      *) die "unknown service '$s' (expected: ${ALL_SERVICES[*]})" ;;
    esac
  done
  if ((${#SERVICES[@]} == 0)); then SERVICES=("${ALL_SERVICES[@]}"); fi
}

has_service() {
  local want="$1" s
  for s in "${SERVICES[@]}"; do [[ "$s" == "$want" ]] && return 0; done
  return 1
}

# Serialise up/down runs (tests may call them concurrently). flock(1) on a file
# would leak the locked fd into the daemons we start and hold the lock forever,
# so we lock fd 9 here and every daemon launch closes inherited fds first.
take_lock() {
  mkdir -p "$LOCAL_DIR"
  exec 9>"$LOCAL_DIR/.lock"
  flock -w 300 9 || die "another up.sh/down.sh still holds $LOCAL_DIR/.lock after 300 s"
}

# Close every fd above 2 in the current (sub)shell. Used right before exec'ing
# a daemon so it doesn't keep our lock fd, or a CI runner's output pipe, open
# (a daemon holding the CI pipe would make the CI step never see EOF).
close_inherited_fds() {
  local fd
  for fd in /proc/"$BASHPID"/fd/*; do
    fd="${fd##*/}"
    [[ "$fd" =~ ^[0-9]+$ ]] && ((fd > 2)) || continue
    # The group confines 2>/dev/null to this one close; a bare
    # `exec ... 2>/dev/null` would redirect the daemon's stderr for good.
    { exec {fd}>&-; } 2>/dev/null || true
  done
}

# read_pid FILE -> prints the pid on the first line of FILE, if numeric.
read_pid() {
  local file="$1" pid=""
  [[ -r "$file" ]] || return 1
  IFS= read -r pid <"$file" || true
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  printf '%s\n' "$pid"
}

# pid_alive PID: the process exists and is not a zombie. Zombies matter here:
# our daemons are re-parented to PID 1, and on this kind of machine PID 1 reaps
# them only after a few seconds, so `kill -0` alone would call a dead server
# alive for a while.
pid_alive() {
  local state
  [[ -r "/proc/$1/status" ]] || return 1
  state="$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null || true)"
  [[ -n "$state" && "$state" != "Z" ]]
}

# pid_matches PID PATTERN: the process is alive and its command line contains
# PATTERN. The pattern guards against a recycled pid: a stale pid file must
# never make us signal an unrelated process.
pid_matches() {
  local pid="$1" pattern="$2" cmdline
  pid_alive "$pid" || return 1
  cmdline="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)"
  [[ "$cmdline" == *"$pattern"* ]]
}

# Is something already listening on 127.0.0.1:PORT? (bash's /dev/tcp needs no
# extra tools; the subshell keeps the probe fd from leaking.)
port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# wait_until SECONDS LABEL CMD... : poll CMD every 0.5 s, printing a dot per
# failed attempt (so CI logs show progress), until it succeeds (return 0) or
# time runs out (return 1). CMD may return 2 to mean "can never succeed" (the
# process died): stop at once instead of waiting out the timeout.
wait_until() {
  local timeout="$1" label="$2"
  shift 2
  local deadline=$((SECONDS + timeout)) rc
  printf 'waiting for %s ' "$label"
  while :; do
    rc=0
    "$@" >/dev/null 2>&1 || rc=$?
    if ((rc == 0)); then
      printf ' ok (%ss)\n' "$((SECONDS - deadline + timeout))"
      return 0
    fi
    if ((rc == 2)); then
      printf ' process exited\n'
      return 1
    fi
    if ((SECONDS >= deadline)); then
      printf ' timed out after %ss\n' "$timeout"
      return 1
    fi
    printf '.'
    sleep 0.5
  done
}

# alive_and_ready NAME PID: readiness probe for wait_until; returns 2 as soon
# as the process is gone so we don't wait out the full timeout for a crash.
alive_and_ready() {
  pid_alive "$2" || return 2
  service_ready "$1"
}

# stop_pid NAME PID [SIGNAL]: send SIGNAL (default TERM), wait up to 30 s,
# then SIGKILL. Returns once the process is gone. Only ever called with a pid
# that pid_matches() confirmed.
stop_pid() {
  local name="$1" pid="$2" sig="${3:-TERM}" i
  kill -"$sig" "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 300; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  warn "$name (pid $pid) ignored SIG$sig for 30 s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  warn "$name (pid $pid) still present after SIGKILL"
  return 1
}

# --- per-service identity and health -------------------------------------------
# Each service has: a pid file, a cmdline pattern, an address, a log, and a
# readiness probe. service_pid prints the pid only if it names a live process
# of the right kind.

service_pid() {
  local pid
  case "$1" in
    redis)
      pid="$(read_pid "$REDIS_PID")" || return 1
      pid_matches "$pid" "redis-server" || return 1
      ;;
    postgres)
      pid="$(read_pid "$PG_PID")" || return 1
      # The postmaster's command line carries `-D <our data dir>`.
      pid_matches "$pid" "postgres -D $PG_DATA" || return 1
      ;;
    kafka)
      pid="$(read_pid "$KAFKA_PID")" || return 1
      pid_matches "$pid" "kafka.Kafka $KAFKA_PROPS" || return 1
      ;;
  esac
  printf '%s\n' "$pid"
}

service_addr() {
  case "$1" in
    redis) printf '127.0.0.1:%s\n' "$REDIS_PORT" ;;
    postgres) printf '127.0.0.1:%s\n' "$PG_PORT" ;;
    kafka) printf '127.0.0.1:%s\n' "$KAFKA_PORT" ;;
  esac
}

service_log() {
  case "$1" in
    redis) printf '%s\n' "$REDIS_LOG" ;;
    postgres) printf '%s\n' "$PG_LOG" ;;
    kafka) printf '%s\n' "$KAFKA_LOG" ;;
  esac
}

# PostgreSQL binaries: those matching an existing data dir's major version if
# installed, else the highest version under /usr/lib/postgresql.
pg_bin() {
  local ver dir
  if [[ -r "$PG_DATA/PG_VERSION" ]]; then
    ver="$(<"$PG_DATA/PG_VERSION")"
    if [[ -x "/usr/lib/postgresql/$ver/bin/postgres" ]]; then
      printf '%s\n' "/usr/lib/postgresql/$ver/bin"
      return 0
    fi
  fi
  dir="$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' 2>/dev/null |
    sort -V | tail -n 1)"
  [[ -n "$dir" ]] || return 1
  printf '%s\n' "${dir%/postgres}"
}

# Readiness probes; each is quick, bounded and side-effect free. `timeout`
# matters: redis-cli has no timeout of its own and hangs forever on a server
# that accepts connections but doesn't answer (e.g. SIGSTOPped).
service_ready() {
  case "$1" in
    redis)
      [[ "$(timeout -k 1 3 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" == "PONG" ]]
      ;;
    postgres)
      local bin
      bin="$(pg_bin)" || return 1
      # -U/-d: otherwise it probes as "root" and the server logs a FATAL
      # "role root does not exist" for every check.
      timeout -k 1 5 "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -t 3
      ;;
    kafka)
      if command -v kcat >/dev/null 2>&1; then
        # -m 5: metadata timeout in seconds; -L: list brokers/topics.
        timeout -k 1 8 kcat -b "127.0.0.1:$KAFKA_PORT" -L -m 5 >/dev/null 2>&1
      else
        port_in_use "$KAFKA_PORT"
      fi
      ;;
  esac
}

# service_state NAME -> prints "up", "unhealthy" (process alive but probe
# fails, e.g. still starting) or "down".
service_state() {
  if service_pid "$1" >/dev/null; then
    if service_ready "$1"; then echo up; else echo unhealthy; fi
  else
    echo down
  fi
}

# print_status_table NAME... ; returns 0 only if every named service is up.
print_status_table() {
  local s state pid rc=0
  printf '%-9s %-10s %-16s %-8s %s\n' SERVICE STATE ADDRESS PID LOG
  for s in "$@"; do
    state="$(service_state "$s")"
    pid="$(service_pid "$s" || true)"
    [[ "$state" == up ]] || rc=1
    printf '%-9s %-10s %-16s %-8s %s\n' "$s" "$state" "$(service_addr "$s")" "${pid:--}" "$(service_log "$s")"
  done
  return "$rc"
}

print_env_exports() {
  cat <<EOF
# environment for the Tally service (these are also its built-in defaults):
export TALLY_REDIS_URL=redis://127.0.0.1:$REDIS_PORT
export TALLY_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
export TALLY_DATABASE_URL=postgres://tally:tally@127.0.0.1:$PG_PORT/tally
EOF
}

# --- stopping -------------------------------------------------------------------
# Shared by down.sh and by up.sh (which restarts a wedged service while it
# already holds the lock, so it must not call down.sh).

# As root, everything PostgreSQL touches runs as the `postgres` OS user
# (initdb and the server refuse to run as root), from `/` so a cwd unreadable
# by postgres (e.g. /root) doesn't break pg_ctl.
as_postgres() {
  if ((EUID == 0)); then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@" # a non-root developer runs the cluster as themselves
  fi
}

redis_down() {
  local pid
  if pid="$(service_pid redis)"; then
    log "stopping redis (pid $pid)"
    stop_pid redis "$pid"
  fi
  rm -f "$REDIS_PID" # gone, or stale (names a dead or unrelated process)
}

postgres_down() {
  local pid bin children c
  if ! pid="$(service_pid postgres)"; then
    rm -f "$PG_PID"
    return 0
  fi
  log "stopping postgres (pid $pid)"
  # Remember the backends: if the postmaster has to be SIGKILLed they would
  # linger (holding shared memory, which blocks the next start).
  children="$(ps -o pid= --ppid "$pid" 2>/dev/null || true)"
  if ! { bin="$(pg_bin)" &&
    as_postgres "$bin/pg_ctl" -D "$PG_DATA" -m fast -w -t 30 stop </dev/null >/dev/null; }; then
    # SIGINT is PostgreSQL's "fast" shutdown (SIGTERM would wait for clients);
    # stop_pid escalates to SIGKILL, after which the backends must go too.
    warn "pg_ctl stop failed; signalling postmaster $pid directly"
    stop_pid postgres "$pid" INT || true
    for c in $children; do
      if pid_matches "$c" postgres; then kill -KILL "$c" 2>/dev/null || true; fi
    done
  fi
  if ! pid_alive "$pid"; then rm -f "$PG_PID"; fi
}

kafka_down() {
  local pid
  if pid="$(service_pid kafka)"; then
    # SIGTERM triggers Kafka's controlled shutdown (flushes logs, a few seconds).
    log "stopping kafka (pid $pid)"
    stop_pid kafka "$pid"
  fi
  rm -f "$KAFKA_PID"
}

service_down() {
  case "$1" in
    redis) redis_down ;;
    postgres) postgres_down ;;
    kafka) kafka_down ;;
  esac
}
