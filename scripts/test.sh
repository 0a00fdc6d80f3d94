#!/usr/bin/env bash
# The whole test suite: unit tests of every crate and the end-to-end tests of the real binary.
# End-to-end tests start real servers; two run at a time on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferrocorn-target}"
# The snapshot tests run the TPC-H queries on a tiny generated TPC-H (3 MB, under a second).
if [ ! -f data/tpch-sf0.01/lineitem.parquet ]; then
  scripts/gen_tpch.sh 0.01 data/tpch-sf0.01 >/dev/null
fi
# The layout rules of ../shared/ARCHITECTURE.md: crate dependencies, module trees.
scripts/check_layout.py
# test-hooks: a switch test builds have (and release builds do not) that lets one end-to-end test
# turn DuckDB's own sandbox off, to show what the kernel's sandbox stops alone.
exec cargo nextest run --workspace --features ferrocorn/test-hooks --no-fail-fast --test-threads 2 "$@"
