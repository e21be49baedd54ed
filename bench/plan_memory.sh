#!/usr/bin/env bash
# Why: `keel plan` predicts per-rank memory from the config alone; this checks the prediction against what a
# real `keel train` on this machine holds at its peak, side by side, for a few single-process configs on the
# reference (CPU) path. A benchmark, not a test (peak RSS depends on the allocator and the machine).
#
# Peak RSS is measured with MALLOC_MMAP_THRESHOLD_=65536: glibc otherwise raises its mmap threshold after the
# first large free and then serves the big activation buffers from the heap, whose freed pages stay resident, so
# RSS would report fragmentation rather than live bytes. The memory that is not the plan's (LibTorch's own code
# and buffers, the data loader, metrics) is taken from the first config as measured - planned and added to the
# others' plans. The activation slope (RSS at micro_batch 4 minus at 1, over 3) isolates the per-sequence part.
# usage: bash bench/plan_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh --target keel >/dev/null
keel=./build/bin/keel
config=experiments/tiny.ini
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$keel data prepare --config "$config" --set data.dir="$work/data" >/dev/null
shape=(--set model.layers=4 --set model.d_model=512 --set model.heads=8 --set model.kv_heads=4
  --set model.ffn_hidden=1376 --set train.grad_accum=1 --set train.threads="$(nproc)")

planned() {  # ARGS...: the plan's total bytes of stage 0
  $keel plan --config "$config" "$@" --json | /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin)["per_rank"][0]["total_bytes"])'
}
measured() {  # ARGS...: peak RSS in bytes of a 2-step run
  rm -rf "$work/run"
  MALLOC_MMAP_THRESHOLD_=65536 /usr/bin/time -f "%M" -o "$work/rss" $keel train --config "$config" \
    --set data.dir="$work/data" --set train.steps=2 --set checkpoint.at_end=false --run-dir "$work/run" "$@" \
    >/dev/null 2>&1
  echo $(($(cat "$work/rss") * 1024))
}

echo "keel plan vs peak RSS: $(date -u +%F), $(git rev-parse --short HEAD), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
printf "%-34s %12s %12s %12s %7s\n" "config" "plan MiB" "+runtime" "measured" "ratio"
baseline=""
for variant in "fp32 512 1" "fp32 512 4" "bf16-mixed 512 1" "bf16-mixed 512 4" "bf16-mixed 256 8" "fp32 1024 2"; do
  read -r precision seq mb <<< "$variant"
  args=("${shape[@]}" --set train.precision="$precision" --set model.seq_len="$seq" --set train.micro_batch="$mb")
  plan=$(planned "${args[@]}")
  rss=$(measured "${args[@]}")
  [ -n "$baseline" ] || baseline=$(/usr/bin/python3 -c "print($rss - $plan)")
  /usr/bin/python3 -c "
p, b, m = $plan, $baseline, $rss
print(f'%-34s %12.1f %12.1f %12.1f %7.3f' % ('$precision T=$seq micro_batch=$mb', p / 2**20, (p + b) / 2**20, m / 2**20, (p + b) / m))"
  eval "rss_${precision//-/_}_${seq}_${mb}=$rss plan_${precision//-/_}_${seq}_${mb}=$plan"
done
echo "runtime (measured - planned, first row): $(/usr/bin/python3 -c "print(round($baseline / 2**20, 1))") MiB"
for precision in fp32 bf16_mixed; do
  /usr/bin/python3 -c "
rss = ($(eval echo "\$rss_${precision}_512_4") - $(eval echo "\$rss_${precision}_512_1")) / 3
plan = ($(eval echo "\$plan_${precision}_512_4") - $(eval echo "\$plan_${precision}_512_1")) / 3
print(f'activation slope per sequence, $precision T=512: plan {plan / 2**20:.1f} MiB, measured {rss / 2**20:.1f} MiB, ratio {plan / rss:.3f}')"
done
