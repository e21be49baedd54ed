#!/usr/bin/env bash
# Why: Keel's training step against a PyTorch reference of the same model, batch and precision, side by side in
# one invocation on this machine; prints tokens/s for both and the ratio. A benchmark, not a test.
# usage: bash bench/step_cpu.sh [CONFIG (default experiments/small.ini)] [STEPS (default 30)]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-experiments/small.ini}
steps=${2:-30}
bash scripts/build.sh --target keel >/dev/null
keel=./build/bin/keel
$keel data prepare --config "$config" >/dev/null
# The value at KEY.KEY... of the JSON object on stdin (the --json output of keel config show / inspect).
json_get() {
  /usr/bin/python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1].split("."): value = value[key]
print(value)' "$1"
}
config_json=$($keel config show --config "$config" --json)
value() { json_get "config.$2.$1" <<< "$config_json"; }  # KEY SECTION
threads=$(nproc)
run_dir=$(mktemp -d)/bench
$keel train --config "$config" --run-dir "$run_dir" --set train.steps="$steps" --set train.threads="$threads" >/dev/null 2>&1
keel_tps=$($keel inspect "$run_dir" --json | json_get metrics.tokens_per_s.median)
ref_tps=$(/usr/bin/python3 bench/reference_llama.py --layers "$(value layers model)" --d_model "$(value d_model model)" \
  --heads "$(value heads model)" --kv_heads "$(value kv_heads model)" --ffn_hidden "$(value ffn_hidden model)" \
  --vocab "$(value vocab model)" --seq_len "$(value seq_len model)" --micro_batch "$(value micro_batch train)" \
  --grad_accum "$(value grad_accum train)" --precision "$(value precision train)" --steps "$steps" --threads "$threads" \
  | sed -n 's/reference_tokens_per_s=//p')
echo "config:    $config ($steps steps, median after 5 warm-up steps, $threads threads, $(date -u +%F), $(uname -m))"
printf "keel:      %10.0f tokens/s\n" "$keel_tps"
printf "pytorch:   %10.0f tokens/s  (Debian python3-torch %s, same model/batch/precision)\n" "$ref_tps" \
  "$(/usr/bin/python3 -c 'import torch;print(torch.__version__)')"
awk -v k="$keel_tps" -v r="$ref_tps" 'BEGIN {printf "ratio:     %10.2fx (keel / pytorch)\n", k / r}'
