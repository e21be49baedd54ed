#!/usr/bin/env bash
# Why: streaming checkpoint I/O (docs/checkpoints.md, "Streaming reads") promises that a resume into another
# layout holds one rank's shard, not the whole model and optimizer state, and that export-hf holds one tensor
# at a time, and that import-hf writes the checkpoint one tensor at a time (reading each from the safetensors
# file, converting it to its fp32 master, making the optimizer's fresh state for it). This measures all three
# on a >= 100M-parameter model on the CPU, side by side with what they are compared with: the whole model +
# AdamW state (12 bytes per parameter), the whole model's fp32 weights, the largest tensor, and LibTorch's own
# baseline (the peak RSS of `keel --help`, which loads the same libraries and allocates nothing).
# A benchmark, not a test (peak RSS depends on the allocator and the machine): CI stays on tiny shapes.
#
# Peak RSS is measured with MALLOC_MMAP_THRESHOLD_=65536 (as bench/plan_memory.sh: freed large buffers return
# to the OS, so RSS counts live bytes, not heap fragmentation). Each rank of the 4-rank resume is timed on its
# own (a wrapper execs /usr/bin/time per rank). The targets are printed next to the numbers:
# a tp=2, pp=2 resume of a checkpoint saved at 1 rank below 0.6x of whole model + optimizer state per process,
# an export below 1.5x its largest tensor plus the baseline; an import (fp32 and bf16 safetensors) well below
# the whole model's fp32 weights (a few copies of the largest tensor over the baseline).
# usage: bash bench/stream_memory.sh        (about 3 minutes and 8 GB of disk in $TMPDIR on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${KEEL_BENCH_NO_BUILD:-}" ] || bash scripts/build.sh --target keel >/dev/null
keel=$(pwd)/build/bin/keel
config=experiments/tiny.ini
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
data=build/test-data
if [ ! -f "$data/prepared.json" ]; then
  data="$work/data"
  $keel data prepare --config "$config" --set data.dir="$data" >/dev/null
fi
# 8 x (4 d^2 + 3 d ffn) + 2 vocab d = 105.1M parameters; tp=2 and pp=2 divide heads, layers and vocab.
shape=(--set data.dir="$data" --set model.layers=8 --set model.d_model=1024 --set model.heads=16
  --set model.kv_heads=16 --set model.ffn_hidden=2816 --set model.seq_len=64 --set train.micro_batch=1
  --set train.grad_accum=1 --set train.precision=fp32 --set train.threads=1 --set metrics.per_tensor=false
  --set optim.decay_steps=4)
export MALLOC_MMAP_THRESHOLD_=65536

peak() {  # OUT ARGS...: runs keel ARGS under /usr/bin/time, peak RSS (bytes) into OUT
  local out=$1
  shift
  /usr/bin/time -f "%M" -o "$work/rss" "$keel" "$@" >"$work/log" 2>&1 || { cat "$work/log"; exit 1; }
  echo $(($(cat "$work/rss") * 1024)) >"$out"
}
mib() { /usr/bin/python3 -c "print(f'{$1 / 2**20:.1f}')"; }

params=$($keel plan --config "$config" "${shape[@]}" --json |
  /usr/bin/python3 -c 'import json,sys; print(int(json.load(sys.stdin)["parameters"]))')
whole=$((params * 12))  # fp32 weights + AdamW's two fp32 moments
peak "$work/base" --help
base=$(cat "$work/base")

# The checkpoint: one step at 1 rank.
peak "$work/save" train --config "$config" "${shape[@]}" --set train.steps=1 --set checkpoint.at_end=true \
  --run-dir "$work/src"
ckpt=$work/src/checkpoints/step-00000001

# The resume at tp=2, pp=2 (4 processes), one more step; each rank timed.
cat >"$work/timed.sh" <<EOF
#!/usr/bin/env bash
exec /usr/bin/time -f "%M" -o "$work/rss.rank\$RANK" "$keel" "\$@"
EOF
chmod +x "$work/timed.sh"
$keel launch --nproc 4 -- "$work/timed.sh" resume --from "$ckpt" --run-dir "$work/r4" --set train.steps=2 \
  --set parallel.tp=2 --set parallel.pp=2 >"$work/log" 2>&1 || { cat "$work/log"; exit 1; }
# The same resume in one process (the saved layout), for comparison.
peak "$work/r1" resume --from "$ckpt" --run-dir "$work/r1run" --set train.steps=2

# Exports: fp32 (one file), bf16, and fp32 sharded at 100MB.
peak "$work/e32" export-hf "$ckpt" "$work/hf32" --no-tokenizer
peak "$work/e16" export-hf "$ckpt" "$work/hf16" --no-tokenizer --dtype bf16
peak "$work/eshard" export-hf "$ckpt" "$work/hfshard" --no-tokenizer --max-shard-size 100MB
# Imports of the exported directories (fp32 and bf16) into fresh runs with AdamW's fresh state.
peak "$work/i32" import-hf "$work/hf32" --run-dir "$work/imp32" --config "$config" --set data.dir="$data"
peak "$work/i16" import-hf "$work/hf16" --run-dir "$work/imp16" --config "$config" --set data.dir="$data"
rm -rf "$work/imp32" "$work/imp16"
largest=$(/usr/bin/python3 - "$work/hf32/model.safetensors" <<'EOF'
import json, struct, sys
with open(sys.argv[1], "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
print(max(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"))
EOF
)

echo "streaming checkpoint I/O, peak RSS: $(date -u +%F), $(git rev-parse --short HEAD), $(nproc) cores," \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "model: $params parameters; whole model + AdamW state $(mib $whole) MiB; largest tensor $(mib "$largest") MiB;" \
  "LibTorch baseline (keel --help) $(mib "$base") MiB"
printf "%-44s %10s %14s %18s\n" "process" "peak MiB" "/ whole state" "(peak-base)/whole"
for r in 0 1 2 3; do
  rss=$(($(cat "$work/rss.rank$r") * 1024))
  /usr/bin/python3 -c "print('%-44s %10.1f %14.3f %18.3f' % ('resume tp=2 pp=2 from 1 rank: rank $r', $rss/2**20, $rss/$whole, ($rss-$base)/$whole))"
done
for name in r1:"resume 1 rank (same layout)" save:"train 1 step, save (1 rank)"; do
  rss=$(cat "$work/${name%%:*}")
  /usr/bin/python3 -c "print('%-44s %10.1f %14.3f %18.3f' % ('${name#*:}', $rss/2**20, $rss/$whole, ($rss-$base)/$whole))"
done
echo "target: resume per process < 0.6 x whole state"
printf "%-44s %10s %18s %18s\n" "export" "peak MiB" "(peak-base)/largest" "1.5 largest + base"
for name in e32:"export-hf fp32, one file" e16:"export-hf bf16" eshard:"export-hf fp32, --max-shard-size 100MB"; do
  rss=$(cat "$work/${name%%:*}")
  /usr/bin/python3 -c "print('%-44s %10.1f %18.3f %18.1f' % ('${name#*:}', $rss/2**20, ($rss-$base)/$largest, (1.5*$largest+$base)/2**20))"
done
echo "target: export peak < 1.5 x largest tensor + baseline; sharded export wrote $(ls "$work/hfshard" | grep -c '^model-') files"
printf "%-44s %10s %18s %18s\n" "import" "peak MiB" "(peak-base)/largest" "(peak-base)/model"
for name in i32:"import-hf fp32 safetensors" i16:"import-hf bf16 safetensors"; do
  rss=$(cat "$work/${name%%:*}")
  /usr/bin/python3 -c "print('%-44s %10.1f %18.3f %18.3f' % ('${name#*:}', $rss/2**20, ($rss-$base)/$largest, ($rss-$base)/($params*4)))"
done
echo "target: import peak a few largest tensors over the baseline, far below the fp32 model ($(mib $((params * 4))) MiB)"
