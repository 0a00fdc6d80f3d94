#!/usr/bin/env bash
# Chaos, the long form: the scenarios of tests/e2e/chaos.rs (worker SIGKILL every 2 s, SIGSTOP
# of a worker, HUP every 5 s, recycling every 50 requests, TTIN/TTOU, SIGKILL of the master),
# each under a 30-user BI mix for SECONDS (default 60), printing what the users saw.
# The suite runs the same scenarios for 6 s each.
# Usage: scripts/chaos.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export FERROCORN_CHAOS_SECONDS="${1:-60}"
exec cargo nextest run --workspace --features ferrocorn/test-hooks --no-fail-fast \
  --test-threads 1 --no-capture -E 'test(/^chaos::/)'
