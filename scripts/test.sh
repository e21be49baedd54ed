#!/usr/bin/env bash
# Why: the README's second command (and exactly what CI runs): set-up, build everything, run the whole
# GoogleTest suite with ctest in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j "$(nproc)" "$@"
