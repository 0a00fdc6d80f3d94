#!/usr/bin/env bash
# Docker entrypoint: validate the configuration (exit 64 with the key's name if it is wrong),
# then replace this shell with the master so that it is PID 1 and receives the signals.
set -euo pipefail
config="${FERROCORN_CONFIG:-/etc/ferrocorn/ferrocorn.toml}"
ferrocorn --config "$config" --check-config "$@"
exec ferrocorn --config "$config" "$@"
