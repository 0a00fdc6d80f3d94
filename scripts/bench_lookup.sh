#!/usr/bin/env bash
# Point lookups by bound key (scripts/wrk/lookup.lua, -c30, 10 s) against raw DuckDB in-process
# on the same snapshot with the same threads (benches/point_lookup.rs, the pool paused meanwhile),
# alternating for ROUNDS rounds: medians and their ratio. With OTHER_BIN (another build of
# ferrocorn, e.g. the commit before a change) and OTHER_CACHE (its cache directory: a snapshot
# format change must not make the two builds rebuild each other's files), that build is measured
# in the same rounds.
#
# ferrocorn links mimalloc in place of malloc, for DuckDB's C++ allocations too; raw DuckDB is
# measured both with glibc's malloc (as an embedding gets it by default) and with mimalloc
# preloaded (Debian's libmimalloc2.0), the same allocator as the server's.
#
# Usage: scripts/bench_lookup.sh [TPCH_DIR] [ROUNDS] [OTHER_BIN OTHER_CACHE]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${2:-3}"
other_bin="${3:-}"
other_cache="${4:-}"
# shellcheck source=scripts/bench_common.sh
source scripts/bench_common.sh
bench_prepare "${1:-data/tpch-sf1}"
raw="$(ls -t "$target"/debug/deps/point_lookup-* 2>/dev/null | grep -v '\.d$' | head -1 || true)"
[ -x "$raw" ] || { echo "missing point_lookup: run cargo build --workspace --all-targets" >&2; exit 1; }
cores="$(nproc)"
mimalloc=/usr/lib/x86_64-linux-gnu/libmimalloc.so.2
[ -f "$mimalloc" ] || apt-get install -y libmimalloc2.0 >/dev/null

start this ""
this_base="$base" this_master="$master"
snapshot="$(ls -t "$data.cache/snapshots"/orders.*.duckdb | head -1)"
if [ -n "$other_bin" ]; then
  start_bin="$other_bin" start_cache="$other_cache" start other ""
  other_base="$base" other_master="$master"
fi

pause() { kill -"$1" "$2" $(pgrep -P "$2") 2>/dev/null || true; }
lookups() { wrk -t2 -c30 -d10s -s scripts/wrk/lookup.lua "$1" | sed -n 's/^Requests\/sec: *//p'; }

this=() other=() rawr=() rawm=()
raw_rate() { "$@" "$snapshot" 10 "$cores" | sed -n 's/.*= \([0-9.]*\)\/s/\1/p'; }
for _ in $(seq 1 "$rounds"); do
  [ -n "$other_bin" ] && pause STOP "$other_master"
  this+=("$(lookups "$this_base")")
  pause STOP "$this_master"
  if [ -n "$other_bin" ]; then
    pause CONT "$other_master"
    other+=("$(lookups "$other_base")")
    pause STOP "$other_master"
  fi
  rawr+=("$(raw_rate "$raw")")
  rawm+=("$(raw_rate env LD_PRELOAD="$mimalloc" "$raw")")
  pause CONT "$this_master"
done

echo "| lookups | each round (per s) | median | fraction of raw, glibc | fraction of raw, mimalloc |"
echo "| --- | --- | --- | --- | --- |"
r="$(median "${rawr[@]}")"
rm_="$(median "${rawm[@]}")"
row() {
  awk -v n="$1" -v all="$2" -v m="$3" -v r="$r" -v q="$rm_" \
    'BEGIN {printf "| %s | %s | %.0f | %.0f %% | %.0f %% |\n", n, all, m, 100 * m / r, 100 * m / q}'
}
row "server, -c30 (this build)" "${this[*]}" "$(median "${this[@]}")"
if [ -n "$other_bin" ]; then row "server, -c30 ($other_bin)" "${other[*]}" "$(median "${other[@]}")"; fi
row "raw DuckDB, $cores threads, glibc malloc" "${rawr[*]}" "$r"
row "raw DuckDB, $cores threads, mimalloc" "${rawm[*]}" "$rm_"
