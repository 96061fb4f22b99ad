#!/usr/bin/env bash
# Bring up the local Tally stack (Redis, PostgreSQL, Kafka) on 127.0.0.1 with
# all state under <repo>/.local/. Idempotent: a healthy service is left alone,
# so a second run is a quick no-op that prints the status.
#
#   deploy/local/up.sh                  # everything
#   deploy/local/up.sh kafka            # just one (or several) services
#
# Ports: TALLY_REDIS_PORT (6379), TALLY_PG_PORT (5432), TALLY_KAFKA_PORT (9092),
# TALLY_KAFKA_CONTROLLER_PORT (9093). Works non-interactively (CI=true, no stdin).
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
  -h | --help)
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac
parse_services "$@"

# --- packages ----------------------------------------------------------------
# A fresh machine may lack the servers; install only what is missing, and run
# `apt-get update` only when we actually have something to install.
ensure_packages() {
  local missing=()
  if has_service redis; then
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v redis-cli >/dev/null || missing+=(redis-tools)
  fi
  if has_service postgres; then
    pg_bin >/dev/null || missing+=(postgresql)
  fi
  if has_service kafka; then
    command -v kcat >/dev/null || missing+=(kcat)
    command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
    if [[ ! -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]]; then
      command -v mvn >/dev/null || missing+=(maven)
    fi
  fi
  # The tests check that badges are well-formed XML.
  command -v xmllint >/dev/null || missing+=(libxml2-utils)
  ((${#missing[@]} > 0)) || return 0

  ((EUID == 0)) || die "missing packages (${missing[*]}) and not root; install them first"
  log "installing missing packages: ${missing[*]}"
  # Debian's postinst scripts would start the *system* redis-server/postgresql
  # services on 6379/5432 and steal our ports. A policy-rc.d that exits 101
  # forbids that; add one only for the duration of the install if none exists.
  local policy=/usr/sbin/policy-rc.d added_policy=0 rc=0
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\n# temporary, from tally deploy/local/up.sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=1
  fi
  {
    apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  } </dev/null || rc=$?
  if ((added_policy)); then rm -f "$policy"; fi
  ((rc == 0)) || die "apt-get install ${missing[*]} failed (exit $rc)"
}

# already_up NAME PID: the healthy fast path, a single readiness probe.
already_up() {
  if service_ready "$1"; then
    log "$1 already up (pid $2)"
    return 0
  fi
  return 1
}

# Refuse to start on a port that someone else (e.g. a system-wide Redis)
# already listens on: our probes would talk to the wrong server.
require_free_port() {
  local service="$1" port="$2"
  if port_in_use "$port"; then
    die "$service: 127.0.0.1:$port is already in use by a process we did not start (set TALLY_*_PORT to use another port)"
  fi
}

# --- Redis -------------------------------------------------------------------
redis_probe() {
  service_pid redis >/dev/null && service_ready redis
}

redis_up() {
  local pid
  if pid="$(service_pid redis)"; then
    if already_up redis "$pid"; then return 0; fi
    if wait_until 10 "redis (pid $pid, running but not answering yet)" redis_probe; then return 0; fi
    warn "redis pid $pid is alive but not answering PING; restarting it"
    redis_down
  fi
  rm -f "$REDIS_PID" # stale: its process is gone
  require_free_port redis "$REDIS_PORT"
  mkdir -p "$REDIS_DIR"
  log "starting redis on 127.0.0.1:$REDIS_PORT"
  # A cache: no RDB snapshots, no AOF. --daemonize makes redis fork, detach and
  # write its own pid file.
  (
    close_inherited_fds
    cd "$REDIS_DIR"
    exec redis-server --daemonize yes --pidfile "$REDIS_PID" --logfile "$REDIS_LOG" \
      --dir "$REDIS_DIR" --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no
  ) </dev/null || die "redis-server refused to start (see $REDIS_LOG)"
  if ! wait_until 10 redis redis_probe; then
    tail -n 40 "$REDIS_LOG" >&2 || true
    die "redis did not become ready"
  fi
}

# --- PostgreSQL ----------------------------------------------------------------
pg_psql() {
  local bin
  bin="$(pg_bin)"
  # client_min_messages: hide "already exists, skipping" NOTICEs on reruns.
  PGCONNECT_TIMEOUT=5 PGOPTIONS='-c client_min_messages=warning' \
    timeout -k 1 60 "$bin/psql" -X -q -A -t -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@"
}

pg_has_stat_statements() {
  local bin libdir sharedir ver
  bin="$(pg_bin)"
  libdir="$("$bin/pg_config" --pkglibdir 2>/dev/null || echo "${bin%/bin}/lib")"
  ver="${bin%/bin}"
  ver="${ver##*/}"
  sharedir="$("$bin/pg_config" --sharedir 2>/dev/null || echo "/usr/share/postgresql/$ver")"
  [[ -f "$libdir/pg_stat_statements.so" && -f "$sharedir/extension/pg_stat_statements.control" ]]
}

postgres_start() {
  local bin sockdir opts
  bin="$(pg_bin)" || die "no PostgreSQL server binaries under /usr/lib/postgresql"
  mkdir -p "$PG_DIR"
  chmod 700 "$PG_DIR"
  if ((EUID == 0)); then
    id postgres >/dev/null 2>&1 || die "OS user 'postgres' is missing (it comes with the postgresql package)"
    chown postgres:postgres "$PG_DIR"
    as_postgres test -w "$PG_DIR" ||
      die "user postgres cannot reach $PG_DIR (a parent directory is not world-searchable?)"
  fi

  if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
    log "initdb $PG_DATA ($("$bin/postgres" --version))"
    # A half-made data dir from an interrupted initdb would make initdb refuse.
    rm -rf "$PG_DATA"
    if ! as_postgres "$bin/initdb" -D "$PG_DATA" --auth=trust -U postgres \
      --encoding=UTF8 --locale=C >"$PG_DIR/initdb.log" 2>&1; then
      cat "$PG_DIR/initdb.log" >&2
      die "initdb failed"
    fi
  fi

  # Unix socket next to the data (not /var/run/postgresql, which belongs to the
  # system cluster); sun_path is limited to 107 bytes, so fall back to /tmp for
  # very deep checkouts.
  sockdir="$PG_DIR"
  if ((${#sockdir} + 20 > 100)); then sockdir=/tmp; fi
  # After a crash (or SIGKILL) the socket lock file survives and names the old
  # postmaster; PostgreSQL refuses to start while that pid exists, which
  # includes the seconds it lingers as a zombie. No live postmaster of ours is
  # running at this point, so a lock whose pid is dead is stale.
  local lock="$sockdir/.s.PGSQL.$PG_PORT.lock" lockpid
  if lockpid="$(read_pid "$lock")" && ! pid_alive "$lockpid"; then
    rm -f "$lock" "$sockdir/.s.PGSQL.$PG_PORT"
  fi

  # pg_ctl hands -o to /bin/sh, hence the inner single quotes around the path.
  # fsync & co. stay at their (safe) defaults.
  opts="-c listen_addresses=127.0.0.1 -p $PG_PORT -k '$sockdir' -c max_connections=200"
  if pg_has_stat_statements; then
    opts+=" -c shared_preload_libraries=pg_stat_statements"
  else
    warn "pg_stat_statements not installed; starting without it"
  fi

  log "starting postgres on 127.0.0.1:$PG_PORT"
  # pg_ctl -w waits for the server to accept connections; the postmaster is
  # started with stdin=/dev/null and output appended to the log, in its own
  # session. close_inherited_fds keeps our lock / CI pipes out of it.
  if ! (
    close_inherited_fds
    as_postgres "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 -o "$opts" start
  ) </dev/null >/dev/null; then
    tail -n 40 "$PG_LOG" >&2 || true
    die "postgres did not start"
  fi
}

# Role `tally`/`tally` and database `tally`, every run: cheap, idempotent, and
# it repairs a database someone dropped.
postgres_provision() {
  pg_psql -d postgres <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tally') THEN
    CREATE ROLE tally LOGIN CREATEDB PASSWORD 'tally';
  END IF;
END
$$;
SELECT 'CREATE DATABASE tally OWNER tally ENCODING ''UTF8'''
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'tally')
\gexec
SQL
  # The extension's views only work when the library is preloaded.
  if [[ "$(pg_psql -d tally -c 'SHOW shared_preload_libraries')" == *pg_stat_statements* ]]; then
    pg_psql -d tally -c 'CREATE EXTENSION IF NOT EXISTS pg_stat_statements' >/dev/null
  fi
}

postgres_probe() {
  local pid
  pid="$(service_pid postgres)" || return 2
  alive_and_ready postgres "$pid"
}

postgres_up() {
  local pid
  if pid="$(service_pid postgres)" && ! already_up postgres "$pid"; then
    if ! wait_until 30 "postgres (pid $pid, running but not ready yet)" postgres_probe; then
      warn "postgres pid $pid is alive but not accepting connections; restarting it"
      postgres_down
      pid=""
    fi
  fi
  if [[ -z "$pid" ]]; then
    # A postmaster.pid whose process is gone: remove it so pg_ctl doesn't
    # mistake an unrelated process with a recycled pid for a running server.
    rm -f "$PG_PID"
    require_free_port postgres "$PG_PORT"
    postgres_start
    wait_until 30 postgres postgres_probe || die "postgres not ready"
  fi
  postgres_provision
}

# --- Kafka ---------------------------------------------------------------------
# Kafka 4.4 from Maven Central jars (no tarball download possible here), KRaft
# single node acting as broker and controller. Started first and waited for
# last, because its JVM takes the longest to come up.

kafka_fetch_libs() {
  [[ -f "$KAFKA_LIBS/kafka_2.13-$KAFKA_VERSION.jar" ]] && return 0
  # Jars borrowed from another stack (TALLY_KAFKA_LIBS) are never replaced from here.
  [[ -z "${TALLY_KAFKA_LIBS:-}" ]] ||
    die "TALLY_KAFKA_LIBS=$KAFKA_LIBS has no kafka_2.13-$KAFKA_VERSION.jar"
  log "fetching Kafka $KAFKA_VERSION jars with maven (once; kept across down.sh --purge)"
  # Copy into a scratch dir and rename, so an interrupted download never
  # leaves a libs/ that looks complete.
  local tmp="$KAFKA_DIR/libs.tmp"
  rm -rf "$tmp"
  mkdir -p "$KAFKA_DIR"
  if ! mvn -q -B -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" </dev/null >"$KAFKA_DIR/mvn.log" 2>&1; then
    tail -n 40 "$KAFKA_DIR/mvn.log" >&2
    die "mvn could not fetch the Kafka jars (see $KAFKA_DIR/mvn.log)"
  fi
  [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "mvn ran but kafka_2.13-$KAFKA_VERSION.jar is missing"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
}

# Rewritten on every start so port changes take effect. Never `localhost`:
# librdkafka may resolve it to ::1 where nothing listens.
kafka_write_config() {
  mkdir -p "$KAFKA_DATA"
  cat >"$KAFKA_PROPS" <<EOF
# Generated by deploy/local/up.sh; edits are overwritten on the next start.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DATA
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.partitions=4
auto.create.topics.enable=true
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
background.threads=2
log.retention.hours=168
EOF
  # One size-capped log file. AbstractConfig dumps every config value (~2500
  # lines per start, server.properties has what matters); the request and
  # state-change loggers are the chatty ones on a busy broker.
  cat >"$KAFKA_LOG4J" <<EOF
# Generated by deploy/local/up.sh.
status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = $KAFKA_LOG
appender.file.filePattern = $KAFKA_LOG.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
EOF
}

kafka_java() {
  java -Dlog4j2.configurationFile="$KAFKA_LOG4J" -cp "$KAFKA_LIBS/*" "$@"
}

# Format the metadata log once. With a static quorum (controller.quorum.voters)
# Kafka 4.x must be formatted WITHOUT --standalone: that flag is only for a
# dynamic quorum (controller.quorum.bootstrap.servers) and is rejected here.
kafka_format() {
  [[ -f "$KAFKA_DATA/meta.properties" ]] && return 0
  local cluster_id
  cluster_id="$(kafka_java -Xmx512m kafka.tools.StorageTool random-uuid | tail -n 1)"
  [[ -n "$cluster_id" ]] || die "kafka StorageTool random-uuid printed nothing"
  log "formatting kafka storage (cluster id $cluster_id)"
  kafka_java -Xmx512m kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" \
    --ignore-formatted >"$KAFKA_DIR/format.out" 2>&1 ||
    {
      cat "$KAFKA_DIR/format.out" >&2
      die "kafka storage format failed"
    }
}

KAFKA_STARTED=""
KAFKA_EXISTING=""

kafka_begin() {
  local pid
  if pid="$(service_pid kafka)"; then
    KAFKA_EXISTING="$pid"
    return 0
  fi
  rm -f "$KAFKA_PID"
  require_free_port kafka "$KAFKA_PORT"
  require_free_port kafka-controller "$KAFKA_CONTROLLER_PORT"
  kafka_fetch_libs
  kafka_write_config
  kafka_format
  log "starting kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT (controller 127.0.0.1:$KAFKA_CONTROLLER_PORT)"
  # setsid: own session, so a CI step ending or Ctrl-C in this terminal does not
  # take the broker with it. The inner bash writes its own pid ($$) and then
  # execs java, so the pid file names the JVM itself.
  (
    close_inherited_fds
    cd "$KAFKA_DIR"
    # shellcheck disable=SC2016 # $$ and $@ belong to the inner bash
    exec setsid nohup bash -c 'echo $$ >"$0"; exec "$@"' "$KAFKA_PID" \
      java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:InitiatingHeapOccupancyPercent=35 -Djava.awt.headless=true \
      -Dlog4j2.configurationFile="$KAFKA_LOG4J" -Dkafka.logs.dir="$KAFKA_DIR" \
      -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS"
  ) </dev/null >>"$KAFKA_OUT" 2>&1 &
  # Give the wrapper a moment to write the pid file.
  local i
  for ((i = 0; i < 50; i++)); do
    [[ -s "$KAFKA_PID" ]] && break
    sleep 0.1
  done
  KAFKA_STARTED="$(read_pid "$KAFKA_PID")" || die "kafka did not write $KAFKA_PID"
}

kafka_fail() {
  printf -- '--- last 40 lines of %s ---\n' "$KAFKA_LOG" >&2
  tail -n 40 "$KAFKA_LOG" >&2 2>/dev/null || true
  if [[ -s "$KAFKA_OUT" ]]; then
    printf -- '--- last 10 lines of %s ---\n' "$KAFKA_OUT" >&2
    tail -n 10 "$KAFKA_OUT" >&2
  fi
  die "$1"
}

kafka_finish() {
  if [[ -n "$KAFKA_EXISTING" ]]; then
    already_up kafka "$KAFKA_EXISTING" && return 0
    wait_until 60 "kafka (pid $KAFKA_EXISTING, running but not ready yet)" \
      alive_and_ready kafka "$KAFKA_EXISTING" && return 0
    warn "kafka pid $KAFKA_EXISTING is alive but not answering metadata requests; restarting it"
    kafka_down
    KAFKA_EXISTING=""
    kafka_begin
  fi
  if ! wait_until 60 kafka alive_and_ready kafka "$KAFKA_STARTED"; then
    if ! pid_alive "$KAFKA_STARTED"; then rm -f "$KAFKA_PID"; fi
    kafka_fail "kafka did not become ready (pid $KAFKA_STARTED)"
  fi
}

# --- main ----------------------------------------------------------------------
take_lock
ensure_packages
if has_service kafka; then kafka_begin; fi
if has_service redis; then redis_up; fi
if has_service postgres; then postgres_up; fi
if has_service kafka; then kafka_finish; fi

echo
print_status_table "${ALL_SERVICES[@]}" || true
echo
print_env_exports
