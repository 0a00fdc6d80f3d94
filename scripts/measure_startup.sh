#!/usr/bin/env bash
# Start ferrocorn with the default configuration (4 workers, sample data), report the time from
# start to all workers ready and each process's idle RSS, then stop it with TERM.
# Usage: scripts/measure_startup.sh [PATH_TO_FERROCORN]   (default: the dev build)
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-${CARGO_TARGET_DIR:-$HOME/.cache/ferrocorn-target}/debug/ferrocorn}"
log="$(mktemp)"
"$bin" --config config/ferrocorn.toml --bind 127.0.0.1:0 2>"$log" &
master=$!
for _ in $(seq 1 600); do
  grep -q "all workers ready" "$log" && break
  sleep 0.05
done
grep "all workers ready" "$log" | sed 's/.*elapsed_ms=\([0-9]*\).*/start to all workers ready: \1 ms/'
sleep 1 # let the workers settle to idle before reading RSS
printf 'master %s: %s\n' "$master" "$(grep VmRSS /proc/$master/status | awk '{print $2, $3}')"
for pid in $(pgrep -P "$master"); do
  printf 'worker %s: %s\n' "$pid" "$(grep VmRSS /proc/$pid/status | awk '{print $2, $3}')"
done
kill -TERM "$master"
wait "$master"
echo "exit code after TERM: $?"
rm -f "$log"
