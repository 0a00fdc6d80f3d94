#!/usr/bin/env bash
# Throughput of a repeated dashboard query answered from the result cache, against the health
# endpoint (and the same query with the cache lookup skipped), through the real server.
#
# Usage: scripts/bench_http.sh [TPCH_DIR] [ROUNDS]     (default: data/tpch-sf1, 5)
#
# Starts ferrocorn (dev build, 4 workers, snapshots in TPCH_DIR.cache, max_requests 0 so that
# recycling does not count), waits until every table is served from its snapshot, then runs wrk
# (installed from Debian if missing) against each endpoint in turn, ROUNDS times, 5 s each, and
# reports the median requests per second and the ratio to /healthz. wrk shares the 2 cores with
# the server: the ratio, measured the same way for each endpoint in one run, is the figure. A
# run with any non-2xx answer fails.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${2:-5}"
# shellcheck source=scripts/bench_common.sh
source scripts/bench_common.sh
bench_prepare "${1:-data/tpch-sf1}"
echo "starting the pool; the snapshots are built once, then reused from $data.cache..."
start http "max_requests = 0"

sql="SELECT o_orderstatus, count(*) AS n, sum(o_totalprice) AS total FROM orders GROUP BY 1 ORDER BY 1"
query="$base/v1/query?sql=$(urlencode "$sql")"
curl -fsS -o /dev/null "$query"
hit="$(curl -fsS -D - -o /dev/null "$query" | tr -d '\r' | sed -n 's/^x-cache: //Ip')"
echo "second request: x-cache $hit"

declare -a health cached uncached
for round in $(seq 1 "$rounds"); do
  health+=("$(rps -c32 "$base/healthz")")
  cached+=("$(rps -c32 "$query")")
  # One connection per worker: the query runs each time, without queueing into 503s.
  uncached+=("$(rps -c4 -H 'Cache-Control: no-cache' "$query")")
  echo "round $round: healthz ${health[-1]}, cached ${cached[-1]}, uncached ${uncached[-1]} req/s"
done
h="$(median "${health[@]}")"
c="$(median "${cached[@]}")"
u="$(median "${uncached[@]}")"
echo
echo "| endpoint | req/s (median of $rounds) | vs /healthz |"
echo "| --- | --- | --- |"
echo "| GET /healthz | $h | 100 % |"
awk -v h="$h" -v c="$c" -v u="$u" 'BEGIN {
  printf "| dashboard query, result cache hit | %s | %.0f %% |\n", c, 100 * c / h
  printf "| dashboard query, Cache-Control: no-cache (runs on the snapshot) | %s | %.0f %% |\n", u, 100 * u / h
}'
