#!/usr/bin/env bash
# Tally's fault-injection suite. Brings up its OWN Redis, PostgreSQL and Kafka (state under
# .local/faults, ports 16380/15433/19092/19093; the shared stack is never touched), builds
# tally, runs every scenario (load + faults + Jepsen-style counter check), prints a markdown
# table, and tears its stack down by pid. Exits non-zero when any scenario finds a violation.
#
#   deploy/faults.sh                     # short: a few seconds of load per scenario (~7 min)
#   deploy/faults.sh --long              # about a minute per scenario, every fault repeated
#   deploy/faults.sh --scenario mixed    # only these scenarios (repeatable; --list names them)
#   deploy/faults.sh --seed 42           # repeat a run's random choices (printed in the header)
#   deploy/faults.sh --release           # test a release build of tally
#   deploy/faults.sh --keep-stack        # leave the suite's stack running afterwards
#
# Elsewhere: TALLY_FAULTS_DIR, TALLY_FAULTS_REDIS_PORT, TALLY_FAULTS_PG_PORT,
# TALLY_FAULTS_KAFKA_PORT, TALLY_FAULTS_KAFKA_CONTROLLER_PORT. CARGO_TARGET_DIR is honoured
# (build elsewhere than target/); TALLY_FAULTS_TALLY_BIN tests that tally binary instead of
# building one. Logs of every Tally process and the report: <TALLY_FAULTS_DIR>/run/.
# Every Tally process the suite starts gets an admin token of the suite's own (whatever
# TALLY_ADMIN_TOKEN says here): its set mode sets, resets and imports counters under load.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd -P)"

die() {
  printf 'faults.sh: %s\n' "$*" >&2
  exit 2
}

keep_stack=0
profile=debug
list_only=0
args=()
for arg in "$@"; do
  case "$arg" in
    --keep-stack) keep_stack=1 ;;
    --release) profile=release ;;
    --list) list_only=1 ;;
    -h | --help)
      sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) args+=("$arg") ;;
  esac
done

# --- the isolated stack --------------------------------------------------------------------
# deploy/local/*.sh read these; tally-faults reads them too, and passes them on to the scripts
# it runs to restart a server.
export TALLY_LOCAL_DIR="${TALLY_FAULTS_DIR:-$repo/.local/faults}"
export TALLY_REDIS_PORT="${TALLY_FAULTS_REDIS_PORT:-16380}"
export TALLY_PG_PORT="${TALLY_FAULTS_PG_PORT:-15433}"
export TALLY_KAFKA_PORT="${TALLY_FAULTS_KAFKA_PORT:-19092}"
export TALLY_KAFKA_CONTROLLER_PORT="${TALLY_FAULTS_KAFKA_CONTROLLER_PORT:-19093}"

# The suite restarts and purges its servers: refuse anything that could be the shared stack.
mkdir -p "$TALLY_LOCAL_DIR"
TALLY_LOCAL_DIR="$(cd "$TALLY_LOCAL_DIR" && pwd -P)"
[[ "$TALLY_LOCAL_DIR" != "$repo/.local" ]] ||
  die "TALLY_FAULTS_DIR is the shared stack's directory; pick another"
for port in "$TALLY_REDIS_PORT" "$TALLY_PG_PORT" "$TALLY_KAFKA_PORT" "$TALLY_KAFKA_CONTROLLER_PORT"; do
  case "$port" in
    6379 | 5432 | 9092 | 9093) die "port $port belongs to the shared stack; pick another" ;;
  esac
done

# Reuse the shared stack's Kafka jars instead of fetching a second copy, but only when they are
# exactly the version up.sh wants: otherwise up.sh would replace that directory.
kafka_version="$(sed -n 's/^KAFKA_VERSION="\(.*\)"$/\1/p' deploy/local/lib.sh)"
shared_kafka_libs="$repo/.local/kafka/libs"
if [[ -n "$kafka_version" && -f "$shared_kafka_libs/kafka_2.13-$kafka_version.jar" ]]; then
  export TALLY_KAFKA_LIBS="$shared_kafka_libs"
fi

# --- build ---------------------------------------------------------------------------------
# Wherever cargo builds: someone else's build in target/ must not be the one we test.
target_dir="${CARGO_TARGET_DIR:-target}"
release_flag=()
if [[ "$profile" == release ]]; then release_flag=(--release); fi
cargo build -q -p tally-faults
if [[ -n "${TALLY_FAULTS_TALLY_BIN:-}" ]]; then
  tally_bin="$TALLY_FAULTS_TALLY_BIN"
  [[ -x "$tally_bin" ]] || die "TALLY_FAULTS_TALLY_BIN=$tally_bin is not an executable"
else
  cargo build -q -p tally "${release_flag[@]+"${release_flag[@]}"}"
  tally_bin="$target_dir/$profile/tally"
fi

if ((list_only)); then
  exec "$target_dir/debug/tally-faults" --list
fi

run_dir="$TALLY_LOCAL_DIR/run"

# Tally processes tally-faults started, should it have died without stopping them: each has a
# pid file, and is killed only if that pid still runs the run's copy of the binary.
stop_leftover_tally_processes() {
  local pid_file pid
  for pid_file in "$run_dir"/pids/*/*.pid; do
    [[ -e "$pid_file" ]] || continue
    pid="$(<"$pid_file")"
    if [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null |
      grep -qF "$run_dir/tally serve"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
  done
}

stop_leftover_tally_processes # from an earlier run that was killed
rm -rf "$run_dir"
mkdir -p "$run_dir"

# --- teardown, whatever happens ------------------------------------------------------------
teardown() {
  local status=$? pid
  trap - EXIT INT TERM
  stop_leftover_tally_processes
  # A Redis left stopped by an interrupted pause would ignore down.sh's SIGTERM for 30 s.
  pid="$(cat "$TALLY_LOCAL_DIR/redis/redis.pid" 2>/dev/null || true)"
  if [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null |
    grep -qF "127.0.0.1:$TALLY_REDIS_PORT"; then
    kill -CONT "$pid" 2>/dev/null || true
  fi
  if ((keep_stack)); then
    deploy/local/status.sh || true
  else
    # By pid files, like every down.sh; --purge so the next run starts from empty stores.
    deploy/local/down.sh --purge >>"$run_dir/stack.log" 2>&1 ||
      printf 'faults.sh: down.sh failed; see %s\n' "$run_dir/stack.log" >&2
  fi
  exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "faults.sh: bringing up the suite's stack in $TALLY_LOCAL_DIR (log: $run_dir/stack.log)"
if ! deploy/local/up.sh >>"$run_dir/stack.log" 2>&1; then
  tail -n 30 "$run_dir/stack.log" >&2
  die "the suite's stack did not come up"
fi

"$target_dir/debug/tally-faults" \
  --tally-bin "$tally_bin" \
  --scripts-dir deploy/local \
  --local-dir "$TALLY_LOCAL_DIR" \
  --work-dir "$run_dir" \
  "${args[@]+"${args[@]}"}"
