#!/usr/bin/env bash
# Why: model.recompute trades compute for activation memory; this measures both, side by side for none, selective
# and full, on a small-but-not-tiny single-process config (reference path, CPU), and puts `keel plan`'s prediction
# next to the measurement. A benchmark, not a test (peak RSS depends on the allocator and the machine).
#
# Activation memory is the slope of peak RSS over the micro-batch size (micro_batch 4 minus 1, over 3): what one
# more sequence adds, without the weights, optimizer state and LibTorch's own baseline; the plan's is the slope of
# its total (kept activations plus the backward's largest transient, which under recomputation is a rebuilt block). MALLOC_MMAP_THRESHOLD_ as in
# bench/plan_memory.sh (freed activation pages must leave RSS). "wall s" is the whole run at micro_batch 4 (start-up
# included): the recomputation's cost in compute.
# usage: [KEEL=path/to/keel] bash bench/recompute_memory.sh [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=3
if [ "${1:-}" = "--steps" ]; then steps=$2; fi
# KEEL=path/to/keel uses that binary as it is; otherwise build/bin/keel, built first.
if [ -n "${KEEL:-}" ]; then keel=$KEEL; else
  bash scripts/build.sh --target keel >/dev/null
  keel=./build/bin/keel
fi
config=experiments/tiny.ini
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$keel data prepare --config "$config" --set data.dir="$work/data" >/dev/null
shape=(--set model.layers=4 --set model.d_model=512 --set model.heads=8 --set model.kv_heads=4
  --set model.ffn_hidden=1376 --set model.seq_len=512 --set train.grad_accum=1 --set train.precision=fp32
  --set train.threads="$(nproc)")

planned() {  # ARGS...: the plan's total bytes of the rank (its slope is activations + the backward's transient)
  $keel plan --config "$config" "$@" --json |
    /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["per_rank"][0]["total_bytes"])'
}
measured() {  # ARGS...: peak RSS in bytes of a short run; leaves the run in $work/run
  rm -rf "$work/run"
  MALLOC_MMAP_THRESHOLD_=65536 /usr/bin/time -f "%M" -o "$work/rss" $keel train --config "$config" \
    --set data.dir="$work/data" --set train.steps="$steps" --set checkpoint.at_end=false --run-dir "$work/run" "$@" \
    >/dev/null 2>&1
  echo $(($(cat "$work/rss") * 1024))
}
echo "activation memory under model.recompute: $(date -u +%F), $(git rev-parse --short HEAD)," \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs"
echo "shape: 4 layers, C 512, 8 heads (4 kv), F 1376, T 512, fp32, reference path; $steps steps per run"
printf "%-10s %16s %16s %10s %10s %12s %12s\n" policy "plan MiB/seq" "measured MiB/seq" "plan/meas" "vs none" \
  "peak MiB mb4" "wall s mb4"
none_slope=""
for policy in none selective full; do
  args=("${shape[@]}" --set model.recompute="$policy")
  plan1=$(planned "${args[@]}" --set train.micro_batch=1)
  plan4=$(planned "${args[@]}" --set train.micro_batch=4)
  rss1=$(measured "${args[@]}" --set train.micro_batch=1)
  start=$(date +%s.%N)
  rss4=$(measured "${args[@]}" --set train.micro_batch=4)
  wall=$(/usr/bin/python3 -c "print($(date +%s.%N) - $start)")
  slope=$(/usr/bin/python3 -c "print(($rss4 - $rss1) / 3)")
  [ -n "$none_slope" ] || none_slope=$slope
  /usr/bin/python3 -c "
plan = ($plan4 - $plan1) / 3
slope, none = $slope, $none_slope
print('%-10s %16.1f %16.1f %10.3f %10.3f %12.1f %12.1f' % ('$policy', plan / 2**20, slope / 2**20, plan / slope,
      slope / none, $rss4 / 2**20, $wall))"
done
