#!/usr/bin/env bash
# A/B of GET /healthz between two ferrocorn binaries with the same configuration (the repository's
# sample data, the defaults): wrk -t2 -c32 for SECONDS per round, ROUNDS rounds, alternating.
# Usage: scripts/bench_ab.sh OLD_BIN NEW_BIN [ROUNDS] [SECONDS]
set -euo pipefail
old="$(realpath "$1")"; new="$(realpath "$2")"; rounds="${3:-3}"; seconds="${4:-5}"
data="$(realpath "$(dirname "$0")/../data/sample")"
command -v wrk >/dev/null || apt-get install -y wrk >/dev/null
work="$(mktemp -d)"
pids=()
trap 'for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null; rm -rf "$work"' EXIT
start() { # NAME BIN PORT
  mkdir -p "$work/$1/cache" "$work/$1/tmp"
  printf 'bind = ["127.0.0.1:%s"]\ndata_dir = "%s"\ncache_dir = "%s"\ntemp_dir = "%s"\n' \
    "$3" "$data" "$work/$1/cache" "$work/$1/tmp" > "$work/$1/ferrocorn.toml"
  (cd "$work/$1" && exec "$2" --config ferrocorn.toml 2>"$work/$1/log") &
  pids+=($!)
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$3/readyz" >/dev/null && return; sleep 0.2; done
  echo "the $1 pool did not become ready:" >&2; cat "$work/$1/log" >&2; exit 1
}
start old "$old" 18101
start new "$new" 18102
echo "round old new ratio"
for round in $(seq "$rounds"); do
  a=$(wrk -t2 -c32 -d"${seconds}s" http://127.0.0.1:18101/healthz | awk '/Requests\/sec/ {print $2}')
  b=$(wrk -t2 -c32 -d"${seconds}s" http://127.0.0.1:18102/healthz | awk '/Requests\/sec/ {print $2}')
  echo "$round $a $b $(awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", b / a}')"
done
