#!/usr/bin/env bash
# Why: configure (once) and build the CPU preset into build/; used by main.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f build/CMakeCache.txt ] || cmake --preset default
cmake --build build -j "$(nproc)" "$@"
