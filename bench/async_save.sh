#!/usr/bin/env bash
# Why: checkpoint.async = true exists to shorten the time a save takes away from training. This measures that
# time on a model of >= 100M parameters (fp32 master weights + AdamW moments: a 1.3 GB rank file) on this
# machine's CPUs, running the same training three ways: without saves, with synchronous saves and with
# asynchronous ones. Per save it prints:
#   (a) the stall at the step boundary, timed inside the trainer (the log line of each save): a synchronous
#       save's whole time; an asynchronous save's snapshot plus its commit. Both modes and their ratio.
#   (b) the run's extra wall time over the run without saves. This also counts steps slowed down by the
#       background writer sharing the CPUs, and it is noisy when other work runs beside the benchmark.
# A benchmark, not a test.
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
steps=14
every=4  # saves after steps 4, 8 and 12; steps 13-14 leave the last background write time to finish
saves=3
shape=(--set model.layers="$layers" --set model.d_model=1024 --set model.heads=16 --set model.kv_heads=16
  --set model.ffn_hidden=2816 --set model.seq_len=64 --set train.micro_batch=1 --set train.grad_accum=1
  --set train.precision=fp32 --set train.threads="$(nproc)" --set train.log_every=1000 --set metrics.flush_every=1000
  --set train.steps=$steps --set checkpoint.at_end=false --set checkpoint.keep_last=2 --set data.dir="$data")

run() {  # NAME ARGS...: prints the process's wall time in seconds
  local name=$1
  shift
  rm -rf "$work/$name"
  local t0 t1
  t0=$(date +%s.%N)
  $keel train --config "$config" "${shape[@]}" --run-dir "$work/$name" "$@" > "$work/$name.log" 2>&1
  t1=$(date +%s.%N)
  /usr/bin/python3 -c "print($t1 - $t0)"
  rm -rf "$work/$name/checkpoints"
}

params=$($keel plan --config "$config" "${shape[@]}" --json |
  /usr/bin/python3 -c 'import json,sys; print(int(json.load(sys.stdin)["parameters"]))')
echo "async checkpoint saves: $(date -u +%F), $(git rev-parse --short HEAD), $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "model: $layers layers, d_model 1024, $((params / 1000000))M parameters, fp32 + AdamW; $steps steps, saves after steps 4, 8, 12"
none_wall=$(run none --set checkpoint.every=0)
sync_wall=$(run sync --set checkpoint.every=$every)
async_wall=$(run async --set checkpoint.every=$every --set checkpoint.async=true)
grep -o "saved in .*" "$work/sync.log" | sed 's/^/  sync:  /'
grep -o "saved in .*" "$work/async.log" | sed 's/^/  async: /'
/usr/bin/python3 - "$work/sync.log" "$work/async.log" "$none_wall" "$sync_wall" "$async_wall" "$saves" <<'PY'
import re, sys
sync_log, async_log = open(sys.argv[1]).read(), open(sys.argv[2]).read()
none, sync_wall, async_wall, saves = float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
sync = [float(x) for x in re.findall(r"saved in ([0-9.]+) s \(every", sync_log)]
asyn = [float(a) + float(b)
        for a, b in re.findall(r"stalled ([0-9.]+) s for the snapshot, ([0-9.]+) s to commit", async_log)]
s, a = sum(sync) / len(sync), sum(asyn) / len(asyn)
print(f"(a) stall per save, mean of {len(sync)}: sync {s:.2f} s, async {a:.2f} s (snapshot + commit); "
      f"ratio {s / a:.1f}x")
print(f"(b) extra wall time per save: sync {(sync_wall - none) / saves:.2f} s, "
      f"async {(async_wall - none) / saves:.2f} s (run without saves: {none:.1f} s)")
PY
