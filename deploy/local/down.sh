#!/usr/bin/env bash
# Stop the local Tally stack started by up.sh. Every process is found through
# its pid file (never by name), sent SIGTERM (PostgreSQL: `pg_ctl stop -m
# fast`), given 30 s, then SIGKILLed. Idempotent. Data is kept unless --purge.
#
#   deploy/local/down.sh                  # stop everything
#   deploy/local/down.sh kafka            # stop one (or several) services
#   deploy/local/down.sh --purge [svc..]  # also delete their data under .local/
#                                         # (the downloaded Kafka jars are kept)
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

purge=0
args=()
for a in "$@"; do
  case "$a" in
    --purge) purge=1 ;;
    -h | --help)
      sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) args+=("$a") ;;
  esac
done
parse_services "${args[@]+"${args[@]}"}"

# Nothing was ever started here: nothing to stop (and don't create .local/).
if [[ ! -d "$LOCAL_DIR" ]]; then
  log "nothing to stop: $LOCAL_DIR does not exist"
  exit 0
fi

take_lock

# Kafka first: it is the slowest to stop and the others don't depend on it.
for s in kafka postgres redis; do
  has_service "$s" || continue
  service_down "$s"
  if service_pid "$s" >/dev/null; then die "$s is still running (pid $(service_pid "$s"))"; fi
done

if ((purge)); then
  for s in "${SERVICES[@]}"; do
    case "$s" in
      redis) rm -rf "$REDIS_DIR" ;;
      postgres) rm -rf "$PG_DIR" ;;
      # Keep libs/ (43 MB from Maven Central) so the next up.sh is fast.
      kafka) if [[ -d "$KAFKA_DIR" ]]; then
        find "$KAFKA_DIR" -mindepth 1 -maxdepth 1 ! -name libs -exec rm -rf {} +
      fi ;;
    esac
    log "purged $s data"
  done
fi

print_status_table "${ALL_SERVICES[@]}" || true
