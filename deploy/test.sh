#!/usr/bin/env bash
# Brings up the local stack (installing what is missing), then runs the whole test suite:
# formatting, lints, unit tests, the end-to-end tests against the real Redis, Kafka and
# PostgreSQL, the API contract (schemathesis against /openapi.json), then the short
# fault-injection suite (on a stack of its own). The shared stack is
# left running for the next run; deploy/local/down.sh stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/local/up.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --no-fail-fast
deploy/contract.sh
deploy/faults.sh
