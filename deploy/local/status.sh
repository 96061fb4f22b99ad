#!/usr/bin/env bash
# Show the state of the local Tally stack: up (process alive and answering),
# unhealthy (process alive, probe fails, e.g. still starting) or down.
# Exit 0 only if every listed service (default: all) is up.
#
#   deploy/local/status.sh [redis|postgres|kafka ...]
set -euo pipefail

# shellcheck source=deploy/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-}" in
  -h | --help)
    sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac
parse_services "$@"

# Read-only: no lock, so status works even while up.sh is waiting for Kafka.
print_status_table "${SERVICES[@]}"
