#!/usr/bin/env bash
# The whole test suite: unit tests of every crate and the end-to-end tests of the real binary.
# End-to-end tests start real servers; two run at a time on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/ferrocorn-target}"
exec cargo nextest run --workspace --no-fail-fast --test-threads 2 "$@"
