#!/usr/bin/env bash
# Why: checkpoint.async = true exists to shorten the time a save takes away from training. This measures that
# time on a model of >= 100M parameters (fp32 master weights + AdamW moments: a 1.3 GB rank file) on this
# machine's CPUs: the same run without saves, with synchronous saves and with asynchronous ones, and prints per
# save (a) the stall at the step boundary (the wall time outside the training steps, over the run without saves)
# and (b) the whole cost (the run's extra wall time, which also counts steps slowed down by the background
# writer sharing the CPUs and memory bandwidth), for both modes and their ratio. A benchmark, not a test.
# usage: bash bench/async_save.sh [LAYERS (default 8)]
#   KEEL_BENCH_DATA=DIR: an already prepared corpus of experiments/tiny.ini (else it is prepared in a temp dir);
#   KEEL_BENCH_NO_BUILD=1: use build/bin/keel as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
layers=${1:-8}
[ -n "${KEEL_BENCH_NO_BUILD:-}" ] || bash scripts/build.sh --target keel >/dev/null
keel=./build/bin/keel
config=experiments/tiny.ini
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data=${KEEL_BENCH_DATA:-$work/data}
[ -f "$data/prepared.json" ] || $keel data prepare --config "$config" --set data.dir="$data" >/dev/null
steps=17
every=5  # saves after steps 5, 10 and 15; steps 16-17 leave the last background write time to finish
saves=3
shape=(--set model.layers="$layers" --set model.d_model=1024 --set model.heads=16 --set model.kv_heads=16
  --set model.ffn_hidden=2816 --set model.seq_len=64 --set train.micro_batch=1 --set train.grad_accum=1
  --set train.precision=fp32 --set train.threads="$(nproc)" --set train.log_every=1000 --set metrics.flush_every=1000
  --set train.steps=$steps --set checkpoint.at_end=false --set checkpoint.keep_last=2 --set data.dir="$data")

run() {  # NAME ARGS...: prints "wall_s steps_s" (process wall time; the sum of the steps' own times)
  local name=$1
  shift
  rm -rf "$work/$name"
  local t0 t1
  t0=$(date +%s.%N)
  $keel train --config "$config" "${shape[@]}" --run-dir "$work/$name" "$@" > "$work/$name.log" 2>&1
  t1=$(date +%s.%N)
  /usr/bin/python3 -c "
import h5py
with h5py.File('$work/$name/metrics.h5', 'r') as f: steps = float(f['train/step_time_s'][()].sum())
print($t1 - $t0, steps)"
  rm -rf "$work/$name/checkpoints"
}

params=$($keel plan --config "$config" "${shape[@]}" --json |
  /usr/bin/python3 -c 'import json,sys; print(int(json.load(sys.stdin)["parameters"]))')
echo "async checkpoint saves: $(date -u +%F), $(git rev-parse --short HEAD), $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "model: $layers layers, d_model 1024, $((params / 1000000))M parameters, fp32 + AdamW; $steps steps, saves after steps 5, 10, 15"
read -r none_wall none_steps <<< "$(run none --set checkpoint.every=0)"
read -r sync_wall sync_steps <<< "$(run sync --set checkpoint.every=$every)"
read -r async_wall async_steps <<< "$(run async --set checkpoint.every=$every --set checkpoint.async=true)"
grep -o "saved in .*" "$work/sync.log" | sed 's/^/  sync:  /'
grep -o "saved in .*" "$work/async.log" | sed 's/^/  async: /'
/usr/bin/python3 - <<EOF
saves = $saves
none = ($none_wall, $none_steps)
rows = {"sync": ($sync_wall, $sync_steps), "async": ($async_wall, $async_steps)}
boundary = lambda r: (r[0] - r[1]) - (none[0] - none[1])
print(f"{'':8} {'stall at the boundary / save':>30} {'extra wall time / save':>24}")
for name, r in rows.items():
    print(f"{name:8} {boundary(r) / saves:28.2f} s {(r[0] - none[0]) / saves:22.2f} s")
s, a = rows["sync"], rows["async"]
print(f"ratio sync / async: stall {boundary(s) / boundary(a):.1f}x, extra wall time {(s[0] - none[0]) / (a[0] - none[0]):.1f}x")
print(f"run without saves: {none[0]:.1f} s wall, {none[1] / $steps:.2f} s per step")
EOF
