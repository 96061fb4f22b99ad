#!/usr/bin/env bash
# The API contract test: runs schemathesis (every check) against a Tally server started for the
# run, so that GET /openapi.json states every constraint the handlers enforce. A request the
# document calls valid must be accepted, one it calls invalid must get a 4xx, every answer must
# match its documented status, headers and schema, and nothing may ever answer 5xx. What the
# requests set off behind the answer counts too: an error or a panic in the server's log (an
# accepted request the aggregator cannot commit, say) fails the run.
#
#   deploy/contract.sh                               # under a minute once tally is built
#   TALLY_CONTRACT_EXAMPLES=200 deploy/contract.sh   # more examples per operation
#   TALLY_CONTRACT_SEED=7 deploy/contract.sh         # another seed (the default is fixed)
#   deploy/contract.sh --include-path-regex '^/v1/counters'   # other arguments go to `st run`
#
# Brings up the shared local stack (deploy/local/up.sh), then runs a debug build of tally on a
# free loopback port against a database, Kafka topic, consumer group and Redis prefix of its own,
# so fuzzed writes never reach other runs; the database and the Redis keys are deleted
# afterwards (the one-partition topic stays, as the tests' topics do). One token is both the
# write API key and the admin token, so the admin routes are exercised too. Schemathesis lives in
# .local/venv (pinned below). Reports: .local/contract/. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd -P)"

SCHEMATHESIS_VERSION="4.32.5"
examples="${TALLY_CONTRACT_EXAMPLES:-100}"
seed="${TALLY_CONTRACT_SEED:-20261201}"
venv="$repo/.local/venv"
work_dir="$repo/.local/contract"
target_dir="${CARGO_TARGET_DIR:-target}"

die() {
  printf 'contract.sh: %s\n' "$*" >&2
  exit 2
}

# --- schemathesis, pinned, in a virtual environment of its own -----------------------------
# The newest Python at hand: Python 3.11's ast module can fail inside hypothesis
# ("AST constructor recursion depth mismatch"), which schemathesis reports as an error.
# TALLY_CONTRACT_PYTHON picks one; pyenv's interpreters count when their shims are not active.
python=""
pyenv_root="$(pyenv root 2>/dev/null || true)"
for candidate in ${TALLY_CONTRACT_PYTHON:-} python3.13 python3.12 \
  ${pyenv_root:+"$pyenv_root"/versions/3.1[23].*/bin/python3} python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import venv' 2>/dev/null; then
    python="$candidate"
    break
  fi
done
[[ -n "$python" ]] || die "no python3 with venv (on Debian: apt-get install python3-venv)"
python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
if [[ -x "$venv/bin/python" && "$(python_version "$venv/bin/python")" != "$(python_version "$python")" ]]; then
  rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv" || die "$python -m venv failed (on Debian: apt-get install python3-venv)"
fi
if [[ "$("$venv/bin/st" --version 2>/dev/null || true)" != "st, version $SCHEMATHESIS_VERSION" ]]; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# --- the stack, and a build of tally -------------------------------------------------------
deploy/local/up.sh >/dev/null
cargo build -q -p tally
tally_bin="$target_dir/debug/tally"

# Everything the run writes goes under names of its own.
suffix="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
token="contract-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export TALLY_DATABASE_URL="${TALLY_DATABASE_URL:-postgres://tally:tally@127.0.0.1:5432/tally}"
admin_database_url="$TALLY_DATABASE_URL"
database="tally_contract_$suffix"
export TALLY_DATABASE_URL="${admin_database_url%/*}/$database"
export TALLY_KAFKA_TOPIC="tally.contract.$suffix"
export TALLY_KAFKA_PARTITIONS=1
export TALLY_AGGREGATOR_GROUP="tally-contract-$suffix"
export TALLY_REDIS_PREFIX="contract$suffix"
export TALLY_HTTP_ADDR="127.0.0.1:0"
export TALLY_API_KEYS="$token"
export TALLY_ADMIN_TOKEN="$token"
export TALLY_LOG_FORMAT=text
export TALLY_SHUTDOWN_TIMEOUT_SECS=10

mkdir -p "$work_dir"
rm -rf "$work_dir/report"
server_log="$work_dir/tally.log"
server_pid=""

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  psql -q "$admin_database_url" -c "DROP DATABASE IF EXISTS $database WITH (FORCE)" \
    >/dev/null 2>&1 || printf 'contract.sh: could not drop database %s\n' "$database" >&2
  if command -v redis-cli >/dev/null; then
    local redis_url="${TALLY_REDIS_URL:-redis://127.0.0.1:6379}"
    # Bucket keys are {PREFIX:b:N}, every other key {}PREFIX:...
    for pattern in "{$TALLY_REDIS_PREFIX:*" "{}$TALLY_REDIS_PREFIX:*"; do
      redis-cli -u "$redis_url" --scan --pattern "$pattern" |
        xargs -r -n 500 redis-cli -u "$redis_url" unlink >/dev/null 2>&1 || true
    done
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

psql -q "$admin_database_url" -c "CREATE DATABASE $database" >/dev/null

# --- the server ----------------------------------------------------------------------------
"$tally_bin" serve >"$server_log" 2>&1 &
server_pid=$!

address=""
for _ in $(seq 1 600); do
  kill -0 "$server_pid" 2>/dev/null || {
    tail -n 30 "$server_log" >&2
    die "tally exited while starting; log: $server_log"
  }
  if [[ -z "$address" ]]; then
    address="$(sed 's/\x1b\[[0-9;]*m//g' "$server_log" |
      grep -o 'tally serving http.addr=127\.0\.0\.1:[0-9]*' | head -n 1 | cut -d= -f2 || true)"
  fi
  if [[ -n "$address" ]] && curl -fsS -o /dev/null "http://$address/readyz"; then
    break
  fi
  sleep 0.1
done
[[ -n "$address" ]] && curl -fsS -o /dev/null "http://$address/readyz" ||
  die "tally did not become ready in 60 s; log: $server_log"
echo "contract.sh: tally serving on $address (pid $server_pid, log $server_log)"

# --- the contract --------------------------------------------------------------------------
# Settings beyond the command line live in deploy/schemathesis.toml. Schemathesis keeps the
# failures it found in .schemathesis/ under its working directory: start each run without them.
rm -rf "$work_dir/.schemathesis"
# A live event stream never ends, so no request of it can complete: it is left out here, and
# crates/tally/tests/widgets.rs covers it.
set +e
(cd "$work_dir" && timeout -k 10 900 "$venv/bin/st" --config-file "$repo/deploy/schemathesis.toml" run "http://$address/openapi.json" \
  --checks all \
  --header "Authorization: Bearer $token" \
  --max-examples "$examples" \
  --seed "$seed" \
  --generation-database none \
  --request-timeout 10 \
  --workers 2 \
  --no-color \
  --report junit,ndjson --report-dir "$work_dir/report" \
  --exclude-path '/v1/counters/{name}/events' \
  "$@")
status=$?
set -e
if ((status != 0)); then
  echo "contract.sh: schemathesis found failures (exit $status); reports in $work_dir/report" >&2
fi
if grep -E ' ERROR |panicked' "$server_log" >"$work_dir/server-errors.log"; then
  echo "contract.sh: the server logged errors during the run (first ones below; all in $server_log)" >&2
  head -n 5 "$work_dir/server-errors.log" | cut -c1-400 >&2
  ((status != 0)) || status=1
fi
exit "$status"
