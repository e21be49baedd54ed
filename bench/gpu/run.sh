#!/usr/bin/env bash
# Why: the GPU benchmark, in one invocation on one GPU: Keel's training step and a PyTorch reference of the same
# model (eager and torch.compile; bench/gpu/llama_reference.py) on the same config, side by side. Prints tokens/s,
# MFU (PaLM formula: 6·N_non-embedding + 12·L·H·Q·T FLOPs per token) against the H100's 989 TFLOP/s spec and
# against a bf16 8192³ matmul measured in the same run, peak memory, and Keel's ratio to each reference.
# usage: bash bench/gpu/run.sh [CONFIG...]   (default: bench/gpu/llama-953m.ini bench/gpu/llama-134m.ini)
# env: STEPS (default 30; the first 10 are warm-up), KEEL_BENCH_SKIP_REFERENCE=1 (Keel only), KEEL_BIN.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps=${STEPS:-30}
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(bench/gpu/llama-953m.ini bench/gpu/llama-134m.ini)
keel=${KEEL_BIN:-build-cuda/bin/keel}
[ -x "$keel" ] || bash bench/gpu/build.sh keel
# shellcheck disable=SC1091
[ -f .gpudeps/env.sh ] && source .gpudeps/env.sh
work=$(mktemp -d)

matmul_tflops=$(python3 - <<'PY'
import torch, time
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); print(f"{10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f}")
PY
)
gpu=$(python3 -c 'import torch; print(torch.cuda.get_device_name())')
echo "device: $gpu; torch $(python3 -c 'import torch; print(torch.__version__)'); bf16 8192^3 matmul: $matmul_tflops TFLOP/s;" \
     "keel $(git rev-parse --short HEAD 2>/dev/null || echo '?'); $(date -u +%F)"

# The value at KEY.KEY... of the JSON object on stdin (the --json output of keel config show / inspect).
json_get() {
  python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1].split("."): value = value[key]
print(value)' "$1"
}
value() { json_get "config.$3.$2" <<< "$config_json"; }  # CONFIG KEY SECTION (CONFIG: the one in $config_json)
for config in "${configs[@]}"; do
  config_json=$("$keel" config show --config "$config" --json)
  L=$(value "$config" layers model); C=$(value "$config" d_model model); H=$(value "$config" heads model)
  K=$(value "$config" kv_heads model); F=$(value "$config" ffn_hidden model); V=$(value "$config" vocab model)
  T=$(value "$config" seq_len model); B=$(value "$config" micro_batch train)
  data_dir=$(value "$config" dir data)
  [ -f "$data_dir/prepared.json" ] || "$keel" data prepare --config "$config" >/dev/null
  # Non-embedding parameters: blocks (q, k, v, o, gate, up, down, two norms), final norm, untied head.
  n_nonemb=$(( L * (C * H * (C / H) + 2 * C * K * (C / H) + H * (C / H) * C + 3 * C * F + 2 * C) + C + V * C ))
  flops_per_token=$(( 6 * n_nonemb + 12 * L * C * T ))
  echo
  echo "== $config: L$L d$C H$H/$K FF$F V$V T$T B$B; $(awk -v n="$n_nonemb" 'BEGIN{printf "%.0fM", n/1e6}') non-embedding params; $steps steps"
  run_dir=$work/$(basename "$config" .ini)
  "$keel" train --config "$config" --run-dir "$run_dir" --set train.steps="$steps" > "$run_dir.out" 2>&1 ||
    { tail -30 "$run_dir.out"; echo "keel train failed on $config"; exit 1; }
  # Median over the steps after the warm-up (same window as the reference).
  keel_tps=$(/usr/bin/env python3 - "$run_dir/metrics.h5" <<'PY'
import sys, h5py
v = sorted(h5py.File(sys.argv[1])["/train/tokens_per_s"][10:]); print(f"{v[len(v) // 2]:.0f}")
PY
)
  # Peak CUDA memory (caching allocator, as torch.cuda.max_memory_allocated) from the run_end event, in GiB.
  keel_peak=$("$keel" inspect "$run_dir" --json | python3 -c 'import json, sys
bytes = (json.load(sys.stdin)["run_end"] or {}).get("peak_cuda_memory_bytes")
print("?" if bytes is None else f"{bytes / 2**30:.2f}")')
  rows=("keel|$keel_tps|$keel_peak")
  if [ "${KEEL_BENCH_SKIP_REFERENCE:-0}" != 1 ]; then
    args="--layers $L --d_model $C --heads $H --kv_heads $K --ffn_hidden $F --vocab $V --seq_len $T --micro_batch $B --steps $steps"
    for mode in eager compile; do
      flag=""; [ "$mode" = compile ] && flag=--compile
      # shellcheck disable=SC2086
      line=$(python3 bench/gpu/llama_reference.py $args $flag 2>"$work/ref-$mode.err" | tail -1) ||
        { tail -20 "$work/ref-$mode.err"; line="tokens_per_s=0 peak_gib=0"; }
      tps=$(echo "$line" | sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p'); peak=$(echo "$line" | sed -n 's/.*peak_gib=\([0-9.]*\).*/\1/p')
      rows+=("pytorch $mode|$tps|$peak")
    done
  fi
  compile_tps=$(printf '%s\n' "${rows[@]}" | awk -F'|' '$1=="pytorch compile"{print $2}')
  printf "%-18s %12s %10s %9s %11s %10s %14s\n" system tokens/s step_ms MFU@989 "MFU@$matmul_tflops" peak_GiB "keel/system"
  for row in "${rows[@]}"; do
    IFS='|' read -r name tps peak <<< "$row"
    awk -v n="$name" -v t="$tps" -v p="$peak" -v f="$flops_per_token" -v m="$matmul_tflops" -v k="$keel_tps" -v bt="$((B * T))" \
      'BEGIN { if (t <= 0) { printf "%-18s %12s\n", n, "failed"; exit }
               printf "%-18s %12.0f %10.1f %8.1f%% %10.1f%% %10s %13.2fx\n", n, t, 1000 * bt / t, 100 * t * f / 989e12,
                      100 * t * f / (m * 1e12), p, k / t }'
  done
  [ -z "$compile_tps" ] || awk -v k="$keel_tps" -v c="$compile_tps" 'BEGIN { printf "keel / torch.compile: %.2fx\n", k / c }'
done
rm -rf "$work"
