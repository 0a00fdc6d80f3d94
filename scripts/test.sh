#!/usr/bin/env bash
# The whole test suite: unit tests of every crate and the end-to-end tests of the real binary.
# End-to-end tests start real servers; two run at a time on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# The build is cargo's usual one (./target, or CARGO_TARGET_DIR if set), the same that the
# README's `cargo run` makes: a newcomer compiles DuckDB once. CI keeps its own persistent
# directory (.ci/run sets CARGO_TARGET_DIR).
# The snapshot tests run the TPC-H queries on a tiny generated TPC-H (3 MB, under a second).
if [ ! -f data/tpch-sf0.01/lineitem.parquet ]; then
  scripts/gen_tpch.sh 0.01 data/tpch-sf0.01 >/dev/null
fi
# The container tests (tests/e2e/container.rs) run the image of deploy/Dockerfile under the old
# stack's limits, one of them with 100 TPC-H Q1 on SF1 (350 MB, about 15 s to generate).
if [ ! -f data/tpch-sf1/lineitem.parquet ]; then
  scripts/gen_tpch.sh 1 data/tpch-sf1 >/dev/null
fi
# They need Docker: Debian's docker.io, a daemon on no bridge, and the base image, made from
# Debian's packages when no registry can be reached (scripts/docker_setup.sh, as root).
FERROCORN_DOCKER="$(scripts/docker_setup.sh | tail -n 1)"
export FERROCORN_DOCKER
# The layout rules of ../shared/ARCHITECTURE.md: crate dependencies, module trees.
scripts/check_layout.py
# test-hooks: a switch test builds have (and release builds do not) that lets one end-to-end test
# turn DuckDB's own sandbox off, to show what the kernel's sandbox stops alone.
exec cargo nextest run --workspace --features ferrocorn/test-hooks --no-fail-fast --test-threads 2 "$@"
