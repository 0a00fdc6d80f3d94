#!/usr/bin/env bash
# Generate TPC-H tables as Parquet (one file per table) for the benchmarks.
# Usage: scripts/gen_tpch.sh [SCALE_FACTOR] [OUT_DIR]    (default: 1, data/tpch-sf1)
# Uses tpchgen-cli from PyPI (installed into the user's Python if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
sf="${1:-1}"
out="${2:-data/tpch-sf$sf}"
if ! command -v tpchgen-cli >/dev/null 2>&1; then
  # A distribution's own Python may refuse system-wide installs (PEP 668): then install for the
  # user, whose script directory is added to PATH below.
  python3 -m pip install --quiet tpchgen-cli 2>/dev/null ||
    python3 -m pip install --quiet --user --break-system-packages tpchgen-cli
  PATH="$PATH:$(python3 -m site --user-base)/bin"
fi
mkdir -p "$out"
tpchgen-cli parquet -s "$sf" --output-dir "$out"
ls -l "$out"
