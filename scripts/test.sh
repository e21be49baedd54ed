#!/usr/bin/env bash
# Why: the README's second command (and exactly what CI runs): set-up, the formatting check, build everything,
# run the whole GoogleTest suite with ctest in parallel, then fuzz every reader of outside files for 20 s each (the clang fuzz
# build is torch-free: well under a minute; docs/testing.md). Arguments go to ctest; KEEL_FUZZ_SECONDS=0 skips
# the fuzzing when iterating locally (CI never sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/format.sh --check
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j "$(nproc)" "$@"
# The experiments' tiny runs (tests/experiments) leave their reports in the build tree: say where.
for report in build/tests/experiments/*/report.html; do
  if [ -f "$report" ]; then echo "experiment report: $report (summary: $(dirname "$report")/summary.txt)"; fi
done
fuzz_seconds=${KEEL_FUZZ_SECONDS:-20}
[ "$fuzz_seconds" = 0 ] || bash scripts/fuzz.sh "$fuzz_seconds"
