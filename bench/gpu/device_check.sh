#!/usr/bin/env bash
# Why: a lent GPU machine gives a task about 15 minutes of device time in all, start-up included, so everything
# worth knowing about Keel on a GPU has to come back from ONE call of at most 9 minutes: does it build (every
# compile error at once), do the kernels match their references, does a CUDA run checkpoint and resume
# bit-exactly, and how fast is Keel against torch.compile and eager PyTorch on the same model. Each step logs to
# OUT/<step>.log and the check goes on past a failed step where it can; the end is a table on stdout and
# OUT/results.json. --cpu-dry-run takes every step it can on a machine without a GPU (the CPU build, the test
# corpus, the tiny config), so a broken script is found before device time is spent on it (ctest runs it).
#
# usage: bash bench/gpu/device_check.sh [--out DIR] [--cpu-dry-run] [--prepare] [--help]
#   --out DIR       where logs and results.json go (default ./gpu-out)
#   --cpu-dry-run   no GPU: use the CPU build (KEEL_BUILD_DIR, default build) and its test corpus
#                   (KEEL_TEST_DATA_DIR, default build/test-data); the build step is a ninja dry run
#   --prepare       on the CPU machine, before the device call: make what the device needs beyond the tree
#                   (.gpudeps/keel-gpu-deps.tar.xz from pack_deps.sh and data/bench-32k, <= 60 MiB in all), then exit
# env: KEEL_CHECK_BUDGET_S (default 540: optional steps are skipped once it would be passed),
#      KEEL_CHECK_STEPS (default 25: steps of each benchmark run; the first 10 are warm-up for the references)
set -uo pipefail
cd "$(dirname "$0")/../.."

usage() { sed -n '/^# usage:/,/^# env:/p' "$0" | sed 's/^# \{0,1\}//'; }
out=./gpu-out
dry=0
prepare=0
while [ $# -gt 0 ]; do
  case $1 in
    --out) [ $# -ge 2 ] || { echo "device_check: --out needs a folder" >&2; exit 2; }; out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    --cpu-dry-run) dry=1; shift ;;
    --prepare) prepare=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "device_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

bench_data=data/bench-32k
deps_archive=.gpudeps/keel-gpu-deps.tar.xz

# --prepare: the one command to run on the CPU machine before a device call.
if [ $prepare -eq 1 ]; then
  set -e
  keel=${KEEL_BIN:-build/bin/keel}
  [ -x "$keel" ] || { echo "device_check --prepare: no $keel; build Keel first (README)" >&2; exit 1; }
  [ -f "$deps_archive" ] || bash bench/gpu/pack_deps.sh "$deps_archive"
  [ -f "$bench_data/prepared.json" ] || "$keel" data prepare --config bench/gpu/llama-953m.ini
  size_kib=$(du -sk "$deps_archive" "$bench_data" | awk '{s += $1} END {print s}')
  echo "device_check --prepare: $deps_archive and $bench_data ready: $((size_kib / 1024)) MiB (limit 60 MiB)"
  [ "$size_kib" -le $((60 * 1024)) ] || { echo "device_check --prepare: over 60 MiB" >&2; exit 1; }
  exit 0
fi

mkdir -p "$out" || { echo "device_check: cannot create $out" >&2; exit 1; }
out=$(cd "$out" && pwd)
# Run dirs (checkpoints: tens of MiB) stay out of OUT, which comes back from the device: logs and results only.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS
budget_s=${KEEL_CHECK_BUDGET_S:-540}
steps=${KEEL_CHECK_STEPS:-25}
: > "$out/steps.tsv"
: > "$out/rows.tsv"
failures=0

# step NAME TIMEOUT_S CMD...: runs CMD (a command or one of the functions below) with its output in
# OUT/NAME.log, in its own process group, which a watchdog ends after TIMEOUT_S; records NAME, exit status and
# seconds in OUT/steps.tsv; prints one line, and the log's tail on failure.
step() {
  local name=$1 limit=$2 t0=$SECONDS rc pid watchdog
  shift 2
  set -m  # background jobs get their own process group: the watchdog ends the step with all its children
  "$@" > "$out/$name.log" 2>&1 < /dev/null &
  pid=$!
  (sleep "$limit" && kill -TERM -- "-$pid" && sleep 10 && kill -KILL -- "-$pid") > /dev/null 2>&1 &
  watchdog=$!
  set +m
  wait "$pid"
  rc=$?
  kill -- "-$watchdog" 2> /dev/null
  wait "$watchdog" 2> /dev/null
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$out/steps.tsv"
  if [ $rc -eq 0 ]; then
    echo "[ok]   $name ($((SECONDS - t0)) s)"
  else
    [ $((SECONDS - t0)) -ge "$limit" ] && echo "(stopped after its $limit s)" >> "$out/$name.log"
    echo "[FAIL] $name (exit $rc after $((SECONDS - t0)) s; $out/$name.log):"
    tail -n 15 "$out/$name.log" | sed 's/^/       /'
    failures=$((failures + 1))
  fi
  return $rc
}
skip() {
  printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$out/steps.tsv"
  echo "[skip] $1: $2"
}
left() { echo $((budget_s - (SECONDS - start))); }
# fits NAME SECONDS: true when a step expected to take SECONDS still fits the budget; else records NAME as
# skipped. A step that runs gets until the budget's end (plus 30 s) as its limit.
fits() {
  [ "$(left)" -ge "$2" ] && return 0
  skip "$1" "the $budget_s s budget has $(left) s left, the step takes about $2 s"
  return 1
}
until_budget() { echo $(($(left) + 30)); }

# The model and batch of a Keel config as llama_reference.py arguments (read from the .ini: the keel binary may
# not be built yet when the cold reference starts).
ini_args() {
  python3 - "$1" <<'PY'
import configparser, sys
ini = configparser.ConfigParser(inline_comment_prefixes=("#",))
ini.read(sys.argv[1])
m = ini["model"]
print(" ".join(f"--{k} {m[k]}" for k in ("layers", "d_model", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len"))
      + f" --micro_batch {ini['train']['micro_batch']}")
PY
}

absolute() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac }
if [ $dry -eq 1 ]; then
  build_dir=$(absolute "${KEEL_BUILD_DIR:-build}")
  device=cpu
  tiny_data=$(absolute "${KEEL_TEST_DATA_DIR:-$build_dir/test-data}")
  [ -f "$tiny_data/prepared.json" ] || { echo "device_check: no prepared corpus in $tiny_data (ctest -R prepare_test_data)" >&2; exit 1; }
  tiny_sets=(--set "data.dir=$tiny_data" --set train.threads=1)
  bench_configs=(experiments/tiny.ini)
  bench_sets=(--set "data.dir=$tiny_data" --set train.threads=1 --set train.steps=8)
else
  build_dir=build-cuda
  device=cuda
  tiny_sets=(--set "data.dir=$PWD/$bench_data" --set model.vocab=32000)
  bench_configs=(bench/gpu/llama-953m.ini bench/gpu/llama-134m.ini)
  bench_sets=(--set train.steps="$steps")
fi
keel=$build_dir/bin/keel
echo "device check: $([ $dry -eq 1 ] && echo 'CPU DRY RUN' || echo GPU), out $out, budget $budget_s s," \
     "keel $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u '+%F %T') UTC"

# The table (stdout) and OUT/results.json from OUT's logs (MFU: PaLM formula, 6·N_non-embedding + 12·L·C·T FLOPs
# per token); run at the end, and at an early stop.
summarize() {
  python3 - "$out" "$dry" "$budget_s" "$((SECONDS - start))" <<'PY' || failures=$((failures + 1))
import configparser, json, os, re, sys
out, dry, budget, elapsed = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
def read(name):
    path = os.path.join(out, name)
    return open(path).read() if os.path.exists(path) else ""
matmul = re.search(r"matmul_tflops=(\d+)", read("matmul.log"))
matmul = float(matmul.group(1)) if matmul else None
steps = [dict(zip(("step", "status", "seconds", "note"), line.split("\t"))) for line in read("steps.tsv").splitlines()]
configs = {}
for line in read("rows.tsv").splitlines():
    config, system, tps, peak = line.split("\t")
    ini = configparser.ConfigParser(inline_comment_prefixes=("#",)); ini.read(config)
    m = {k: int(ini["model"][k]) for k in ("layers", "d_model", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len")}
    L, C, H, K, F, V, T = (m[k] for k in ("layers", "d_model", "heads", "kv_heads", "ffn_hidden", "vocab", "seq_len"))
    D = C // H
    n_nonemb = L * (C * H * D + 2 * C * K * D + H * D * C + 3 * C * F + 2 * C) + C + V * C
    flops = 6 * n_nonemb + 12 * L * C * T
    tps = float(tps) if tps not in ("", "null", "None") else None
    peak = int(float(peak)) if peak not in ("", "null", "None") else None
    configs.setdefault(config, {"flops_per_token": flops, "systems": {}})["systems"][system] = {
        "tokens_per_s": tps,
        "mfu_989": tps * flops / 989e12 if tps else None,
        "mfu_matmul": tps * flops / (matmul * 1e12) if tps and matmul else None,
        "peak_gib": peak / 2**30 if peak else None}
for config, c in configs.items():
    keel = c["systems"].get("keel", {}).get("tokens_per_s")
    for system, s in c["systems"].items():
        s["keel_over_system"] = keel / s["tokens_per_s"] if keel and s["tokens_per_s"] else None
resume = re.search(r"resume_bit_exact=(\d)", read("tiny_resume.log"))
results = {"dry_run": dry, "commit": os.popen("git rev-parse HEAD 2>/dev/null").read().strip(),
           "preflight": read("preflight.log").strip().splitlines(), "matmul_tflops": matmul,
           "resume_bit_exact": bool(int(resume.group(1))) if resume else None, "steps": steps,
           "configs": configs, "elapsed_s": elapsed, "budget_s": budget}
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=2)
def fmt(v, spec):
    return "-" if v is None else format(v, spec)
for config, c in configs.items():
    print(f"\n{config}")
    print(f"{'system':<18} {'tokens/s':>10} {'MFU@989':>8} {'MFU@' + fmt(matmul, '.0f'):>9} {'peak GiB':>9} {'keel/system':>12}")
    for system, s in c["systems"].items():
        print(f"{system:<18} {fmt(s['tokens_per_s'], '10.0f'):>10} {fmt(s['mfu_989'] and 100 * s['mfu_989'], '7.1f'):>7}% "
              f"{fmt(s['mfu_matmul'] and 100 * s['mfu_matmul'], '7.1f'):>8}% {fmt(s['peak_gib'], '9.2f'):>9} "
              f"{fmt(s['keel_over_system'], '11.2f'):>11}x")
print(f"\nresume bit-exact: {results['resume_bit_exact']}; {elapsed} s of {budget} s; {os.path.join(out, 'results.json')}")
PY
}

# 1. Preflight: the GPU, torch and its CUDA, where nccl.h is (the same probe as the build's KEEL_NCCL=AUTO).
preflight() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else
    echo "nvidia-smi: absent"
  fi
  if python3 -c 'import torch' 2> /dev/null; then
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu",
                torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
    torch_prefix=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
  else
    echo "torch: not importable"
    torch_prefix=""
  fi
  cmake -DKEEL_SOURCE_DIR="$PWD" -DTORCH_PREFIX="$torch_prefix" -P bench/gpu/nccl_where.cmake
  if [ $dry -eq 0 ]; then
    python3 -c 'import torch; assert torch.cuda.is_available(), "torch sees no CUDA device"'
  fi
}
step preflight 60 preflight || { [ $dry -eq 1 ] || exit 1; }
cat "$out/preflight.log"

# 2. A cold torch.compile reference in the background: fills the inductor cache while Keel builds.
cold_pid=""
if [ $dry -eq 0 ]; then
  set -m
  (
    for config in "${bench_configs[@]}"; do
      # shellcheck disable=SC2046  # ini_args prints a list of arguments
      python3 bench/gpu/llama_reference.py $(ini_args "$config") --compile --steps 2 --warmup 0
    done
  ) > "$out/reference_cold.log" 2>&1 < /dev/null &
  cold_pid=$!
  set +m
else
  step reference_syntax 30 python3 -m py_compile bench/gpu/llama_reference.py
  for config in bench/gpu/llama-953m.ini bench/gpu/llama-134m.ini; do
    echo "reference arguments for $config: $(ini_args "$config")" >> "$out/reference_args.log"
  done
  grep -q -- "--d_model 2048" "$out/reference_args.log" || { echo "[FAIL] reference arguments"; failures=$((failures + 1)); }
fi

# 3. The build: only keel, the optimizer plugins and the kernel tests, keeping going past errors.
targets=(keel keel_plugin_adamw keel_plugin_lion keel_kernel_tests)
dry_build() {  # the targets exist in the CPU build's graph, and ninja can plan them (it runs nothing)
  local listed target
  listed=$(ninja -C "$build_dir" -t targets all) || return 1
  for target in "${targets[@]}"; do
    grep -q "^$target: " <<< "$listed" || { echo "device_check: no target $target in $build_dir"; return 1; }
  done
  ninja -C "$build_dir" -n -k 0 "${targets[@]}"
}
if [ $dry -eq 1 ]; then
  step build 120 dry_build
else
  KEEL_CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Release -DKEEL_BUILD_TESTS=ON ${KEEL_CMAKE_ARGS:-}" KEEL_BUILD_TOOL_ARGS="-k 0" \
    step build 330 bash bench/gpu/build.sh "${targets[@]}"
  grep -E "error:|Error [0-9]" "$out/build.log" | head -n 40 > "$out/build_errors.log"
fi
# shellcheck disable=SC1091
[ -f .gpudeps/env.sh ] && source .gpudeps/env.sh
[ -x "$keel" ] || { echo "device check: no $keel; stopping"; summarize; exit 1; }

# 4. The kernels' architecture (flags; cuobjdump where present) and the kernel tests. On a GPU a skipped test
#    means the kernels did not run, which fails the step.
library=$build_dir/kernels/libkeel_kernels_cuda.a
if [ -f "$library" ]; then
  step kernel_arch 60 cmake -DCOMPILE_COMMANDS="$build_dir/compile_commands.json" -DARCHS=90 -DLIBRARY="$library" \
    -P tests/gpu_build/cuda_arch_test.cmake
else
  skip kernel_arch "no $library (nvcc absent at configure time)"
fi
kernel_tests() {
  local binary=$build_dir/tests/gpu_build/keel_kernel_tests
  [ -x "$binary" ] || binary=$build_dir/tests/keel_unit_tests  # the CPU build's tests hold the same cases
  "$binary" --gtest_filter='Kernel*:ModelFusedPath*' --gtest_output="json:$out/kernel_tests.json" || return 1
  if [ $dry -eq 0 ] && grep -q '^\[  SKIPPED \]' "$out/kernel_tests.log"; then
    echo "device_check: kernel tests skipped on a GPU machine: the CUDA kernels were not exercised"
    return 1
  fi
}
step kernel_tests 120 kernel_tests

# 5. A tiny run on the device: 12 steps with a checkpoint at 6, then a resume from it; the two step-12 losses
#    and grad norms are compared bit for bit (required on CPU; reported on a GPU).
inspect_get() { "$keel" inspect "$1" --json | python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1].split("."): value = value[key] if value is not None else None
print("null" if value is None else repr(value))' "$2"; }
tiny_resume() {
  "$keel" train --config experiments/tiny.ini --run-dir "$work/tiny" "${tiny_sets[@]}" --set train.device="$device" \
    --set train.steps=12 --set checkpoint.every=6 --set metrics.flush_every=1 || return 1
  "$keel" resume --from "$work/tiny/checkpoints/step-00000006" --run-dir "$work/tiny-resumed" || return 1
  local a b
  a="$(inspect_get "$work/tiny" metrics.loss.last) $(inspect_get "$work/tiny" metrics.grad_norm.last)"
  b="$(inspect_get "$work/tiny-resumed" metrics.loss.last) $(inspect_get "$work/tiny-resumed" metrics.grad_norm.last)"
  echo "step 12 loss and grad norm: straight $a; resumed $b"
  if [ "$a" = "$b" ]; then echo "resume_bit_exact=1"; else echo "resume_bit_exact=0"; [ $dry -eq 0 ]; fi
}
fits tiny_resume 40 && step tiny_resume "$(until_budget)" tiny_resume

# 6. The benchmark: Keel on each config, then the warm torch.compile and eager references on the same shapes.
if [ -n "$cold_pid" ]; then  # it must not share the GPU with a measurement: wait a minute at most
  waited=0
  while kill -0 "$cold_pid" 2> /dev/null && [ $waited -lt 60 ]; do sleep 2; waited=$((waited + 2)); done
  kill -- "-$cold_pid" 2> /dev/null && echo "cold reference stopped after a minute's wait (the warm one compiles the rest)"
  wait "$cold_pid" 2> /dev/null
  echo "cold reference: $(grep -c tokens_per_s "$out/reference_cold.log") of ${#bench_configs[@]} configs ran"
fi
if [ $dry -eq 0 ]; then
  python3 - > "$out/matmul.log" 2>&1 <<'PY'
import torch, time
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(10): a @ b
torch.cuda.synchronize(); print(f"matmul_tflops={10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f}")
PY
fi
keel_bench() {  # CONFIG NAME
  "$keel" train --config "$1" --run-dir "$work/$2" "${bench_sets[@]}" --set checkpoint.every=0 \
    --set checkpoint.at_end=false || return 1
  echo "tokens_per_s=$(inspect_get "$work/$2" metrics.tokens_per_s.median)"
  echo "peak_bytes=$(inspect_get "$work/$2" run_end.peak_cuda_memory_bytes)"
}
# Expected seconds per benchmark step on an H100/H200 (start-up included), for the budget: 953M, then 134M.
expected_s() { case $1 in keel_llama-953m) echo 60 ;; compile_llama-953m) echo 90 ;; eager_llama-953m) echo 50 ;;
  compile_*) echo 60 ;; *) echo 30 ;; esac }
for config in "${bench_configs[@]}"; do
  name=$(basename "$config" .ini)
  fits "keel_$name" "$(expected_s "keel_$name")" || continue
  if step "keel_$name" "$(until_budget)" keel_bench "$config" "keel-$name"; then
    tps=$(sed -n 's/^tokens_per_s=//p' "$out/keel_$name.log"); peak=$(sed -n 's/^peak_bytes=//p' "$out/keel_$name.log")
    printf '%s\tkeel\t%s\t%s\n' "$config" "$tps" "$peak" >> "$out/rows.tsv"
  fi
  if [ $dry -eq 1 ]; then
    skip "reference_$name" "no GPU"
    continue
  fi
  for mode in compile eager; do
    flag=""; [ $mode = compile ] && flag=--compile
    fits "${mode}_$name" "$(expected_s "${mode}_$name")" || continue
    # shellcheck disable=SC2046,SC2086  # argument lists
    if step "${mode}_$name" "$(until_budget)" python3 bench/gpu/llama_reference.py $(ini_args "$config") $flag --steps "$steps" --warmup 10; then
      line=$(grep tokens_per_s= "$out/${mode}_$name.log" | tail -n 1)
      tps=$(echo "$line" | sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p')
      peak=$(echo "$line" | sed -n 's/.*peak_gib=\([0-9.]*\).*/\1/p')
      peak_bytes=$(awk -v g="${peak:-0}" 'BEGIN { printf "%.0f", g * 1073741824 }')
      printf '%s\tpytorch %s\t%s\t%s\n' "$config" "$mode" "$tps" "$peak_bytes" >> "$out/rows.tsv"
    fi
  done
done

# 7. The table and results.json.
summarize
echo "device check: $failures failed step(s)"
[ $failures -eq 0 ]
