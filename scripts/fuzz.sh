#!/usr/bin/env bash
# Why: the readers that take files from outside (configs, token shards, later checkpoints) must refuse bad input
# with their documented error, never crash. This configures and builds the clang "fuzz" preset (torch-free,
# seconds), then runs every libFuzzer target for a bounded time, nproc targets at a time, and exits non-zero if
# any target crashes, hangs (> 10 s on one input), runs out of memory (> 2 GiB) or leaks. Usage:
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]        (default 30; CI runs 20 from scripts/test.sh)
# New inputs libFuzzer finds are kept in build-fuzz/corpus/<target>/ between runs; a crashing input is saved in
# build-fuzz/artifacts/<target>/ and the reproduce command is printed. See docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || { echo "usage: $0 [SECONDS_PER_TARGET > 0]" >&2; exit 2; }

cmake --preset fuzz >/dev/null  # cheap; refreshes the target list (build-fuzz/fuzz/*.conf)
cmake --build --preset fuzz -j "$(nproc)"

confs=(build-fuzz/fuzz/*.conf)
[ -e "${confs[0]}" ] || { echo "fuzz: no targets configured in build-fuzz/fuzz/" >&2; exit 1; }
# Findings abort with a stack trace; leaks count as findings (libFuzzer's default with ASan).
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-abort_on_error=0:detect_leaks=1}

run_target() {  # NAME CORPUS MAX_LEN DICT LOG OPTIONS ASAN_OPTIONS
  local name=$1 seeds=$2 max_len=$3 dict=$4 log=$5 options=$6 asan=$7
  local found=build-fuzz/corpus/$name artifacts=build-fuzz/artifacts/$name
  local extra=()
  [ -z "$dict" ] || extra+=(-dict="$dict")
  # shellcheck disable=SC2206
  [ -z "$options" ] || extra+=($options)
  local asan_options=$ASAN_OPTIONS
  [ -z "$asan" ] || asan_options="$asan_options:$asan"
  # A target's own LeakSanitizer suppressions (leaks inside uninstrumented libraries), if it has any.
  local lsan_options=${LSAN_OPTIONS:-}
  [ ! -f "tests/fuzz/$name.supp" ] || lsan_options="suppressions=$PWD/tests/fuzz/$name.supp"
  mkdir -p "$found" "$artifacts"
  ASAN_OPTIONS=$asan_options LSAN_OPTIONS=$lsan_options "build-fuzz/fuzz/$name" -max_total_time="$seconds" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "${extra[@]}" "$found" "$seeds" >"$log" 2>&1
}

mkdir -p build-fuzz/logs
declare -A pids=()
failed=()
for conf in "${confs[@]}"; do
  name=$(basename "$conf" .conf)
  corpus=$(sed -n 's/^corpus=//p' "$conf")
  max_len=$(sed -n 's/^max_len=//p' "$conf")
  dict=$(sed -n 's/^dict=//p' "$conf")
  options=$(sed -n 's/^options=//p' "$conf")
  asan=$(sed -n 's/^asan_options=//p' "$conf")
  if [ ! -x "build-fuzz/fuzz/$name" ]; then echo "fuzz: $name is configured but not built" >&2; exit 1; fi
  while [ "$(jobs -rp | wc -l)" -ge "$(nproc)" ]; do wait -n || true; done
  echo "fuzz: $name for ${seconds}s (max_len $max_len, seeds $corpus)"
  run_target "$name" "$corpus" "$max_len" "$dict" "build-fuzz/logs/$name.log" "$options" "$asan" &
  pids[$name]=$!
done
for name in "${!pids[@]}"; do
  if wait "${pids[$name]}"; then
    stats=$(grep -E '^stat::(number_of_executed_units|new_units_added)' "build-fuzz/logs/$name.log" |
            sed 's/^stat:://' | tr -s ' ' | paste -sd ' ' -)
    echo "fuzz: $name ok ($stats)"
  else
    failed+=("$name")
    echo "fuzz: $name FAILED; last lines of build-fuzz/logs/$name.log:" >&2
    tail -n 40 "build-fuzz/logs/$name.log" >&2
    for artifact in "build-fuzz/artifacts/$name"/*; do
      [ -e "$artifact" ] && echo "fuzz: reproduce with: build-fuzz/fuzz/$name $artifact" >&2
    done
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (fix the bug, then add the input to tests/fuzz/corpus/<target>/)" >&2
  exit 1
fi
echo "fuzz: all ${#pids[@]} targets ran ${seconds}s without a finding"
