#!/usr/bin/env bash
# What the pool-wide slot table (share_query_slots) buys under the BI mix: two pools on TPC-H SF1
# with the documented defaults and the sort keys, one sharing its slots (the default) and one
# not, run alternately with the same load (scripts/wrk/bimix.lua, -c30), ROUNDS times SECONDS each.
#
# Usage: scripts/bench_sharing.sh [TPCH_DIR] [SECONDS] [ROUNDS]   (default: data/tpch-sf1, 30, 2)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${2:-30}"
rounds="${3:-2}"
# shellcheck source=scripts/bench_common.sh
source scripts/bench_common.sh
bench_prepare "${1:-data/tpch-sf1}"

start shared ""
shared="$base"
start own "share_query_slots = false"
own="$base"
echo "| round | slots | req/s | p50 | p99 | non-2xx | socket errors |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
for round in $(seq 1 "$rounds"); do
  for pool in shared own; do
    url="$shared"
    [ "$pool" = own ] && url="$own"
    read -r rps p50 p99 non2xx errors < <(wrk_row -c30 -d"${seconds}s" -s scripts/wrk/bimix.lua "$url")
    label="shared (default)"
    [ "$pool" = own ] && label="each worker its own"
    echo "| $round | $label | $rps | $p50 | $p99 | $non2xx | $errors |"
  done
done
