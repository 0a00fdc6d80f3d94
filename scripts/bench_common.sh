# What the HTTP benchmarks share (sourced by bench_http.sh, bench_load.sh, bench_sharing.sh): starting a
# pool on TPC-H with the documented defaults plus the sort keys, and small helpers.
# Expects $data (the TPC-H directory), $work (a scratch directory) and $bin (the binary); sets
# $base (the pool's URL) and $master (its pid), and adds the pid to the pids array.

# start NAME EXTRA_TOML: a pool with the documented defaults, the sort keys and EXTRA_TOML.
start() {
  local name="$1" extra="$2"
  cat >"$work/$name.toml" <<CONFIG
bind = ["127.0.0.1:0"]
data_dir = "$data"
cache_dir = "$data.cache"
temp_dir = "$work"
$extra

[datasets.orders]
sort_key = "o_orderkey"

[datasets.lineitem]
sort_key = "l_orderkey"
CONFIG
  "$bin" --config "$work/$name.toml" 2>"$work/$name.log" &
  master=$!
  pids+=("$master")
  for _ in $(seq 1 1200); do
    grep -q "all workers ready" "$work/$name.log" && break
    sleep 0.05
  done
  local port
  port="$(sed -n 's/.*listening address=127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/$name.log" | head -1)"
  base="http://127.0.0.1:$port"
  # Every table served from its snapshot (built once, then reused from $data.cache).
  for _ in $(seq 1 1200); do
    if curl -fsS "$base/v1/datasets" | python3 -c '
import json, sys
d = json.load(sys.stdin)["datasets"]
sys.exit(0 if d and all(x["storage"] == "snapshot" and x["pending_version"] is None for x in d) else 1)'; then
      break
    fi
    sleep 0.5
  done
}

urlencode() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$1"; }

# wrk_row ARGS...: one wrk run with latency; prints "req/s p50 p99 non2xx errors".
wrk_row() {
  local out
  out="$(wrk -t2 --latency "$@")"
  printf '%s %s %s %s %s\n' \
    "$(sed -n 's/^Requests\/sec: *//p' <<<"$out")" \
    "$(awk '$1 == "50%" {print $2}' <<<"$out")" \
    "$(awk '$1 == "99%" {print $2}' <<<"$out")" \
    "$(sed -n 's/.*Non-2xx or 3xx responses: *//p' <<<"$out" | grep . || echo 0)" \
    "$(sed -n 's/.*Socket errors: *//p' <<<"$out" | tr ' ' '_' | grep . || echo none)"
}
