#!/usr/bin/env bash
# Sustained query load on TPC-H SF1 with the documented defaults (plus the sort keys and an
# access log): what issue 10 asks to be shown, side by side in one run.
#
# Usage: scripts/bench_load.sh [TPCH_DIR] [SECONDS]     (default: data/tpch-sf1, 60)
#
# 1. 100 concurrent TPC-H Q1 (Cache-Control: no-cache): answers by status, wall time, peak pool
#    RSS, against 100 × one Q1's time / cores.
# 2. Point lookups by bound key, the dashboard aggregate (no-cache) and the BI mix
#    (scripts/wrk/*.lua) at -c30 and -c100, SECONDS each (wrk waits up to 30 s for an answer,
#    the query deadline), recycling at its default: req/s,
#    p50/p99, non-2xx answers and socket errors, recycles per minute, and the p99 of requests a
#    successor served in its first second (the access log's resolution: the second it became
#    ready and the next) against the pool's p99 over the same run.
# 3. Point lookups against raw DuckDB in-process on the same snapshot with the same threads
#    (benches/point_lookup.rs).
# 4. A 1,000,000-row export of lineitem as JSON, CSV and Arrow, with and without compression
#    (Accept-Encoding: zstd, gzip): seconds, bytes on the wire and MB/s of the uncompressed
#    result, medians of 3.
# 5. /healthz against the bare hyper server (examples/bare_hyper.rs, 4 processes on
#    SO_REUSEPORT listeners), with the default configuration and with max_requests = 0,
#    alternating, 3 rounds of 5 s, medians.
#
# wrk and the server share the machine's cores; every figure comes from this one run.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${2:-60}"
# shellcheck source=scripts/bench_common.sh
source scripts/bench_common.sh
bench_prepare "${1:-data/tpch-sf1}"
bare="$target/debug/examples/bare_hyper"
raw="$(ls -t "$target"/debug/deps/point_lookup-* 2>/dev/null | grep -v '\.d$' | head -1 || true)"
for exe in "$bare" "$raw"; do
  [ -x "$exe" ] || { echo "missing $exe: run cargo build --workspace --all-targets" >&2; exit 1; }
done
cores="$(nproc)"

# The p99 of requests successors served in their first second against all requests of a run,
# from the access log (stdin) and the master's "worker ready" lines.
cat >"$work/successor.py" <<'PY'
import re, sys, datetime
log, since = sys.argv[1], sys.argv[2]
ready = {}
for line in open(log):
    m = re.match(r"(\S+)Z\s+INFO worker ready slot=\d+ pid=(\d+)", line)
    if m and m.group(1)[:19] >= since:
        t = datetime.datetime.fromisoformat(m.group(1)[:19]).replace(tzinfo=datetime.timezone.utc)
        ready[format(int(m.group(2)), "x")] = int(t.timestamp())
first, every = [], []
for line in sys.stdin:
    m = re.search(r"\[([^\]]+)\] .* (\d+)ms (\w+)-\w+$", line.strip())
    if not m:
        continue
    t = int(datetime.datetime.strptime(m.group(1), "%d/%b/%Y:%H:%M:%S %z").timestamp())
    ms, pid = int(m.group(2)), m.group(3)
    every.append(ms)
    if pid in ready and ready[pid] <= t <= ready[pid] + 1:
        first.append(ms)
def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * 0.99))] if xs else None
print(f"{p99(first)} ms (n={len(first)}) vs {p99(every)} ms" if first else f"- (no successor) vs {p99(every)} ms")
PY

# Resident memory of the master and all its workers, in MiB.
pool_rss() {
  local total=0 p
  for p in "$master" $(pgrep -P "$master" || true); do
    total=$((total + $(awk '/VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
  done
  echo $((total / 1024))
}

start main "accesslog = \"$work/main.access\""
echo "pool ready at $base (documented defaults, sort keys, access log)"
echo

# --- 1. 100 concurrent Q1 ------------------------------------------------------------------------
q1="SELECT l_returnflag, l_linestatus, sum(l_quantity) AS sum_qty, sum(l_extendedprice) AS sum_base_price, sum(l_extendedprice * (1 - l_discount)) AS sum_disc_price, sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge, avg(l_quantity) AS avg_qty, avg(l_extendedprice) AS avg_price, avg(l_discount) AS avg_disc, count(*) AS count_order FROM lineitem WHERE l_shipdate <= DATE '1998-12-01' - INTERVAL 90 DAY GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus"
q1_url="$base/v1/query?sql=$(urlencode "$q1")"
singles=()
for _ in 1 2 3 4 5; do
  singles+=("$(curl -fsS -o /dev/null -w '%{time_total}' -H 'Cache-Control: no-cache' "$q1_url")")
done
single="$(printf '%s\n' "${singles[@]}" | sort -g | sed -n 3p)"
peak=0
(while :; do pool_rss; sleep 0.1; done) >"$work/rss" &
sampler=$!
started="$(date +%s.%N)"
seq 100 | xargs -P 100 -I{} curl -s -o /dev/null -w '%{http_code}\n' -H 'Cache-Control: no-cache' \
  "$q1_url" >"$work/q1.status"
ended="$(date +%s.%N)"
kill "$sampler" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
peak="$(sort -n "$work/rss" | tail -1)"
wall="$(awk -v a="$started" -v b="$ended" 'BEGIN {printf "%.2f", b - a}')"
target_wall="$(awk -v s="$single" -v c="$cores" 'BEGIN {printf "%.2f", 1.3 * 100 * s / c}')"
echo "## 100 concurrent TPC-H Q1, no result cache"
echo
echo "| answers | wall time | target (1.3 × 100 × single / $cores cores) | single Q1 (median of 5) | peak pool RSS |"
echo "| --- | --- | --- | --- | --- |"
echo "| $(sort "$work/q1.status" | uniq -c | awk '{printf "%s × %s ", $1, $2}')| ${wall} s | ${target_wall} s | ${single} s | ${peak} MiB |"
echo

# --- 2. Sustained load ---------------------------------------------------------------------------
dashboard="SELECT o_orderstatus, count(*) AS n, sum(o_totalprice) AS total FROM orders GROUP BY 1 ORDER BY 1"
dashboard_url="$base/v1/query?sql=$(urlencode "$dashboard")"

# run NAME CONNECTIONS WRK_ARGS...: one wrk run; prints a table row.
run() {
  local name="$1" c="$2"
  shift 2
  local before_recycles before_lines
  before_recycles="$(grep -c 'worker spawned' "$work/main.log" || true)"
  before_lines="$(wc -l <"$work/main.access")"
  local from
  from="$(date -u +%Y-%m-%dT%H:%M:%S)"
  local rps p50 p99 non2xx errors
  # A client that waits as long as the query deadline allows (wrk's own default gives up after
  # 2 s and counts a timeout).
  read -r rps p50 p99 non2xx errors < <(wrk_row -c"$c" -d"${seconds}s" --timeout 30s "$@")
  local recycles=$(( $(grep -c 'worker spawned' "$work/main.log" || true) - before_recycles ))
  # Requests successors served in their first second (the access log has one-second times)
  # against all requests of this run, from the access log and the master's "worker ready" lines.
  local successor
  successor="$(tail -n +"$((before_lines + 1))" "$work/main.access" |
    python3 "$work/successor.py" "$work/main.log" "$from")"
  local per_minute
  per_minute="$(awk -v r="$recycles" -v s="$seconds" 'BEGIN {printf "%.1f", r * 60 / s}')"
  echo "| $name | -c$c | $rps | $p50 | $p99 | $non2xx | ${errors//_/ } | $per_minute | $successor |"
}

echo "## Sustained load, ${seconds} s each, recycling at the default (max_requests = 1000)"
echo
echo "| workload | connections | req/s | p50 | p99 | non-2xx | socket errors | recycles/min | successor p99 in its first second vs the run's p99 (access log, ms) |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for c in 30 100; do
  run "point lookups" "$c" -s scripts/wrk/lookup.lua "$base"
  run "dashboard aggregate, no-cache" "$c" -H 'Cache-Control: no-cache' "$dashboard_url"
  run "BI mix" "$c" -s scripts/wrk/bimix.lua "$base"
done
echo

# --- 3. Raw DuckDB on the same snapshot ----------------------------------------------------------
lookups="$(wrk -t2 -c30 -d10s -s scripts/wrk/lookup.lua "$base" | sed -n 's/^Requests\/sec: *//p')"
kill -STOP "$master" $(pgrep -P "$master") 2>/dev/null || true
snapshot="$(ls -t "$data.cache/snapshots"/orders.*.duckdb | head -1)"
raw_line="$("$raw" "$snapshot" 10 "$cores")"
kill -CONT "$master" $(pgrep -P "$master") 2>/dev/null || true
raw_rate="$(sed -n 's/.*= \([0-9.]*\)\/s/\1/p' <<<"$raw_line")"
echo "## Point lookups against raw DuckDB in-process ($cores threads, the same snapshot)"
echo
echo "| server, -c30, 10 s | raw DuckDB, 10 s | fraction |"
echo "| --- | --- | --- |"
awk -v s="$lookups" -v r="$raw_rate" 'BEGIN {printf "| %.0f req/s | %.0f lookups/s | %.0f %% |\n", s, r, 100 * s / r}'
echo

# --- 4. Exports with and without compression -----------------------------------------------------
export_url="$base/v1/query?sql=$(urlencode "SELECT * FROM lineitem LIMIT 1000000")"
echo "## A 1,000,000-row export of lineitem, medians of 3 (Cache-Control: no-store)"
echo
echo "| format | coding | time | bytes on the wire | uncompressed MB/s |"
echo "| --- | --- | --- | --- | --- |"
for format in json csv arrow; do
  plain_bytes=""
  for coding in identity zstd gzip; do
    samples=()
    for _ in 1 2 3; do
      samples+=("$(curl -fsS -o /dev/null -w '%{time_total} %{size_download}' -H 'Cache-Control: no-store' \
        -H "Accept-Encoding: $coding" "$export_url&format=$format")")
    done
    line="$(printf '%s\n' "${samples[@]}" | sort -g | sed -n 2p)"
    time="${line% *}"
    bytes="${line#* }"
    [ "$coding" = identity ] && plain_bytes="$bytes"
    awk -v f="$format" -v c="$coding" -v t="$time" -v b="$bytes" -v p="$plain_bytes" 'BEGIN {
      printf "| %s | %s | %.2f s | %.1f MB (%.0f %%) | %.0f |\n", f, c, t, b / 1e6, 100 * b / p, p / 1e6 / t
    }'
  done
done
echo

# --- 5. /healthz against bare hyper --------------------------------------------------------------
main_base="$base"
start norecycle "max_requests = 0"
norecycle_base="$base"
"$bare" 4 >"$work/bare.out" &
pids+=("$!")
for _ in $(seq 1 100); do grep -q listening "$work/bare.out" && break; sleep 0.05; done
bare_base="http://$(sed -n 's/.*address=\(.*\)/\1/p' "$work/bare.out")"
declare -a hb hd hn
for _ in 1 2 3; do
  hb+=("$(rps -c32 "$bare_base/healthz")")
  hd+=("$(rps -c32 "$main_base/healthz")")
  hn+=("$(rps -c32 "$norecycle_base/healthz")")
done
b="$(median "${hb[@]}")"
d="$(median "${hd[@]}")"
n="$(median "${hn[@]}")"
echo "## /healthz against bare hyper (4 processes, SO_REUSEPORT), wrk -c32, medians of 3 × 5 s"
echo
echo "| server | req/s | vs bare hyper |"
echo "| --- | --- | --- |"
echo "| bare hyper | $b | 100 % |"
awk -v b="$b" -v d="$d" -v n="$n" 'BEGIN {
  printf "| ferrocorn, defaults (recycling on) | %s | %.0f %% |\n", d, 100 * d / b
  printf "| ferrocorn, max_requests = 0 | %s | %.0f %% |\n", n, 100 * n / b
}'
