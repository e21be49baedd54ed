#!/usr/bin/env bash
# Why: Keel reads files from outside and does its own index arithmetic over memory-mapped shards, so the whole
# GoogleTest suite (unit, integration tests that drive the real `keel` and `keel-spm` binaries, fuzz corpus
# replays) also runs under AddressSanitizer + UndefinedBehaviorSanitizer. Any finding fails the test that
# triggered it: Keel's targets are built with -fno-sanitize-recover=all (cmake/KeelHelpers.cmake), and the
# options below make every finding fatal. LibTorch is not instrumented: ASan still sees its heap through the
# malloc interceptors, but not its internal bugs. Usage: bash scripts/asan.sh [ctest arguments, e.g. -R Config]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f build-asan/CMakeCache.txt ] || cmake --preset asan
cmake --build build-asan -j "$(nproc)"

# Inherited by every test process and by the keel / keel-spm processes the tests start. ASan and LSan reports
# go to files, one per process: an integration test that expects `keel` to fail (EXPECT_NE(exit_code, 0))
# would otherwise pass with a finding on that error path, so any report file fails this script on its own.
reports=$PWD/build-asan/sanitizer-reports
rm -rf "$reports"
mkdir -p "$reports"
asan_options=(
  detect_leaks=1                   # LeakSanitizer at exit; passes with no suppression file
  check_initialization_order=1     # static-init order bugs between Keel's translation units
  strict_init_order=1
  detect_stack_use_after_return=1  # a reference to a dead stack frame (e.g. into a returned local)
  strict_string_checks=1           # C string functions read to the terminator, not just what they use
  log_path="$reports/asan"         # + .PID; read back below
)
export ASAN_OPTIONS=${ASAN_OPTIONS:-$(IFS=:; echo "${asan_options[*]}")}
# UBSan aborts on the first finding (-fno-sanitize-recover). With GCC it ignores log_path and reports on stderr.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
status=0
ctest --preset asan "$@" || status=$?
if compgen -G "$reports/*" >/dev/null; then
  for report in "$reports"/*; do
    echo "=== sanitizer report $report"
    cat "$report"
  done
  echo "asan: FAILED: sanitizer reports above (also in $reports/)" >&2
  exit 1
fi
[ "$status" -eq 0 ] && echo "asan: ctest passed under ASan+UBSan, no sanitizer report"
exit "$status"
