#!/usr/bin/env bash
# Brings up the local stack (installing what is missing), then runs Tally on 127.0.0.1:8080
# in the foreground. Ctrl-C stops Tally; deploy/local/down.sh stops the stack.
set -euo pipefail
cd "$(dirname "$0")/.."
deploy/local/up.sh
cargo build --release -p tally
./target/release/tally migrate
exec ./target/release/tally serve "$@"
