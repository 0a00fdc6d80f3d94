#!/usr/bin/env bash
# Binary upgrades (USR2) under load, against the same load without them, side by side.
#
# One pool with the repository's configuration (config/ferrocorn.toml: the defaults, workers
# from the CPU count) over DATA_DIR. wrk plays 30 users sending queries that each miss the result
# cache (a random bound). After a warm-up (no snapshot left to build, then one round unmeasured),
# ROUNDS times two rounds of SECONDS in alternating order: one quiet, one in which the binary is
# reinstalled and the master sent USR2 UPGRADES times, each once the previous upgrade is done.
# Prints, per round, requests, errors (connect, read/write, non-2xx, timeouts) and latency, and
# each upgrade's time from USR2 to the new master's pid in the pid file.
# Usage: scripts/bench_upgrade.sh [DATA_DIR] [ROUNDS] [SECONDS] [UPGRADES]
set -euo pipefail
cd "$(dirname "$0")/.."
data="$(realpath "${1:-data/tpch-sf1}")"; rounds="${2:-3}"; seconds="${3:-20}"; upgrades="${4:-2}"
command -v wrk >/dev/null || apt-get install -y wrk >/dev/null
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
work="$(mktemp -d)"
trap 'kill -TERM "$(cat "$work/pid" 2>/dev/null)" 2>/dev/null || true; sleep 1; rm -rf "$work"' EXIT
cp "$target/debug/ferrocorn" "$work/ferrocorn"
port=18200
users=scripts/wrk/count_orders.lua
export FERROCORN_BIND="127.0.0.1:$port" FERROCORN_DATA_DIR="$data" \
  FERROCORN_CACHE_DIR="$work/cache" FERROCORN_TEMP_DIR="$work" FERROCORN_PIDFILE="$work/pid"
(exec "$work/ferrocorn" --config "$PWD/config/ferrocorn.toml" 2>"$work/log") &
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; kill -0 $! 2>/dev/null || break; sleep 0.2; done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$work/log" >&2; exit 1; }
now_ms() { date +%s%3N; }
upgrade() { # reinstall the binary (a new file renamed over the old one), USR2, wait for the pid
  local old; old="$(cat "$work/pid")"
  cp "$target/debug/ferrocorn" "$work/ferrocorn.staged" && mv "$work/ferrocorn.staged" "$work/ferrocorn"
  local t0; t0="$(now_ms)"
  kill -USR2 "$old"
  for _ in $(seq 1200); do [ "$(cat "$work/pid" 2>/dev/null)" != "$old" ] && break; sleep 0.05; done
  [ "$(cat "$work/pid")" != "$old" ] || { echo "upgrade did not complete" >&2; tail "$work/log" >&2; exit 1; }
  echo "$(( $(now_ms) - t0 ))"
  while kill -0 "$old" 2>/dev/null; do sleep 0.05; done
}
published() {
  curl -sf "http://127.0.0.1:$port/v1/datasets" | python3 -c '
import json, sys
d = json.load(sys.stdin)
d = d.get("datasets", d) if isinstance(d, dict) else d
sys.exit(0 if d and all(x.get("pending_version") is None for x in d) else 1)'
}
for _ in $(seq 1200); do published && break; sleep 0.5; done
wrk -t2 -c30 -d"${seconds}s" -s "$users" "http://127.0.0.1:$port" >/dev/null
quiet() { echo "$1 quiet $(wrk -t2 -c30 -d"${seconds}s" -s "$users" "http://127.0.0.1:$port" | tail -1) -"; }
usr2() {
  wrk -t2 -c30 -d"${seconds}s" -s "$users" "http://127.0.0.1:$port" | tail -1 > "$work/wrk.out" &
  local wrk_pid=$! times=()
  sleep "$(( seconds / (upgrades + 2) ))"
  for _ in $(seq "$upgrades"); do
    times+=("$(upgrade)")
    sleep "$(( seconds / (upgrades + 2) ))"
  done
  wait "$wrk_pid"
  echo "$1 usr2 $(cat "$work/wrk.out") $(IFS=,; echo "${times[*]}")"
}
echo "round kind requests connect_err rw_err non2xx timeouts p50_ms p99_ms max_ms upgrade_ms"
for round in $(seq "$rounds"); do
  if (( round % 2 )); then quiet "$round"; usr2 "$round"; else usr2 "$round"; quiet "$round"; fi
done
