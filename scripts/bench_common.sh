# What the HTTP benchmarks share (sourced by bench_http.sh, bench_load.sh, bench_sharing.sh):
# their preparation, starting a pool on TPC-H with the documented defaults plus the sort keys,
# and small helpers. Run from the repository's root.

# bench_prepare TPCH_DIR: set $data, $target and $bin, check the data and the binary, install wrk
# if missing, make the scratch directory $work; every pid added to the pids array (and its
# children) is stopped, and $work removed, on exit.
bench_prepare() {
  data="$(realpath "$1")"
  target="${CARGO_TARGET_DIR:-$HOME/.cache/ferrocorn-target}"
  bin="$target/debug/ferrocorn"
  [ -f "$data/orders.parquet" ] || { echo "no TPC-H data in $data: run scripts/gen_tpch.sh 1" >&2; exit 1; }
  [ -x "$bin" ] || { echo "no ferrocorn binary at $bin: run cargo build --workspace --all-targets" >&2; exit 1; }
  command -v wrk >/dev/null || apt-get install -y wrk >/dev/null
  work="$(mktemp -d)"
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  local p
  for p in "${pids[@]}"; do
    pkill -TERM -P "$p" 2>/dev/null || true
    kill -TERM "$p" 2>/dev/null || true
    # A pool a benchmark paused (SIGSTOP) acts on the TERM only once continued.
    pkill -CONT -P "$p" 2>/dev/null || true
    kill -CONT "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$work"
}

# start NAME EXTRA_TOML sets $base (the pool's URL) and $master (its pid), and adds the pid to
# the pids array.

# start NAME EXTRA_TOML: a pool with the documented defaults, the sort keys and EXTRA_TOML, run
# by $bin (or $start_bin when set) with its cache in $data.cache (or $start_cache when set).
# Pools never share a cache directory (a second one is refused): a pool started while another
# of this run holds $data.cache gets a copy of its snapshots in $work instead.
start() {
  local name="$1" extra="$2"
  local cache="${start_cache:-$data.cache}"
  if [ -z "${start_cache:-}" ] && [ -n "${bench_cache_taken:-}" ]; then
    cache="$work/$name.cache"
    mkdir -p "$cache"
    cp -r "$data.cache/snapshots" "$cache/" 2>/dev/null || true
    rm -f "$cache/snapshots/build.lock"
  fi
  [ -z "${start_cache:-}" ] && bench_cache_taken=1
  cat >"$work/$name.toml" <<CONFIG
bind = ["127.0.0.1:0"]
data_dir = "$data"
cache_dir = "$cache"
temp_dir = "$work"
$extra

[datasets.orders]
sort_key = "o_orderkey"

[datasets.lineitem]
sort_key = "l_orderkey"
CONFIG
  "${start_bin:-$bin}" --config "$work/$name.toml" 2>"$work/$name.log" &
  master=$!
  pids+=("$master")
  for _ in $(seq 1 1200); do
    grep -q "all workers ready" "$work/$name.log" && break
    kill -0 "$master" 2>/dev/null || { echo "pool $name exited:" >&2; cat "$work/$name.log" >&2; exit 1; }
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

# rps WRK_ARGS...: wrk's requests per second for one 5-second run; fails on any non-2xx answer.
rps() {
  local out
  out="$(wrk -t2 -d5s "$@")"
  if grep -q "Non-2xx" <<<"$out"; then
    echo "non-2xx answers: $(grep Non-2xx <<<"$out")" >&2
    exit 1
  fi
  sed -n 's/^Requests\/sec: *//p' <<<"$out"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
