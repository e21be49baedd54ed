#!/usr/bin/env bash
# Why: CrystalCoder moved its mixture from text to code in stages; whether such a change helps is an A/B question
# that needs paired arms and more than one seed. Per seed N this trains a base run (train.seed = data.seed = N)
# on a text-heavy mix to an intermediate checkpoint, branches one arm per mixture from that checkpoint (only
# data.mixture differs; same weights, optimizer state and data order), evaluates every arm's per-source
# validation loss at fixed steps (keel eval), and reports arm-minus-baseline differences with their spread over
# seeds (summary.txt from analyze.py, report.html from keel report).
#
#   experiments/datamix-ab/run.sh [--tiny] [--seeds N] [--out DIR]
#
# --tiny: the CI size (datamix-tiny.ini). --seeds: seeds 1..N (default 3; at least 2 for a spread). --out: output
# directory (default runs/datamix-ab-<time>); an existing one is refused. Environment: KEEL_BIN (a built keel;
# default: build it with scripts/build.sh), KEEL_DATA_DIR (an already prepared corpus of the same sources, e.g.
# the tests' one; default: prepare data/bundled), KEEL_JOBS (runs side by side, default 2), PYTHON (python3 with
# h5py).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
die() { echo "datamix-ab: error: $*" >&2; exit 1; }
usage() { awk '/^#   experiments\//{p=1} p && /^#/{sub(/^# ?/, ""); print; next} p{exit}' "$0"; }

# The arms: name and data.mixture. The baseline keeps the base run's mix; the others move toward code.
baseline=text
arm_mixture() {
  case $1 in
    text) echo "prose=0.7,code=0.3" ;;   # unchanged (CrystalCoder stage 1: mostly text)
    even) echo "prose=0.5,code=0.5" ;;   # stage 2: half and half
    code) echo "prose=0.3,code=0.7" ;;   # stage 3: mostly code
    *) die "unknown arm $1" ;;
  esac
}
arms=(text even code)

tiny=0
seeds=3
out=""
while (( $# )); do
  case $1 in
    --tiny) tiny=1; shift ;;
    --seeds) (( $# >= 2 )) || die "--seeds needs a number"; seeds=$2; shift 2 ;;
    --seeds=*) seeds=${1#--seeds=}; shift ;;
    --out) (( $# >= 2 )) || die "--out needs a directory"; out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ $seeds =~ ^[0-9]+$ ]] || die "--seeds must be a whole number, got '$seeds'"
(( seeds >= 2 )) || die "--seeds must be at least 2 (a spread over seeds needs two), got $seeds"
config=$here/datamix.ini
(( tiny )) && config=$here/datamix-tiny.ini
[ -n "$out" ] || out=$repo/runs/datamix-ab-$( (( tiny )) && echo tiny- )$(date +%Y%m%d-%H%M%S)
[ -e "$out" ] && die "$out already exists; pass a new --out (results are never overwritten)"
jobs=${KEEL_JOBS:-2}
[[ $jobs =~ ^[1-9][0-9]*$ ]] || die "KEEL_JOBS must be a positive integer, got '$jobs'"
# A python3 with h5py: $PYTHON, else the first of python3 and /usr/bin/python3 (Debian's python3-h5py) that has it.
python=""
for candidate in ${PYTHON:-python3 /usr/bin/python3}; do
  if "$candidate" -c "import h5py" 2>/dev/null; then python=$candidate; break; fi
done
[ -n "$python" ] || die "no python3 with h5py (tried: ${PYTHON:-python3 /usr/bin/python3}; Debian: apt-get install python3-h5py)"

if [ -n "${KEEL_BIN:-}" ]; then
  keel=$KEEL_BIN
else
  (cd "$repo" && bash scripts/build.sh --target keel)
  keel=$repo/build/bin/keel
fi
[ -x "$keel" ] || die "keel binary not found or not executable: $keel"

mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
start=$(date +%s)
say() { echo "[datamix-ab $(( $(date +%s) - start ))s] $*"; }

if [ -n "${KEEL_DATA_DIR:-}" ]; then
  [ -f "$KEEL_DATA_DIR/prepared.json" ] || die "KEEL_DATA_DIR=$KEEL_DATA_DIR holds no prepared corpus (prepared.json)"
  data_dir=$(cd "$KEEL_DATA_DIR" && pwd)
else
  data_dir=$repo/data/bundled
  say "preparing data in $data_dir (once; later runs find it up to date)"
  (cd "$repo" && "$keel" data prepare --config "$config" --set "data.dir=$data_dir") > "$out/logs/prepare.log" 2>&1 ||
    { tail -5 "$out/logs/prepare.log"; die "keel data prepare failed (log: $out/logs/prepare.log)"; }
fi

# FUNC ITEM...: FUNC ITEM for every item, $jobs at a time; names the items that failed.
run_parallel() {
  local func=$1 item i
  shift
  local -a failed=() batch=() pids=()
  while (( $# )); do
    batch=("${@:1:$jobs}")
    shift "${#batch[@]}"
    pids=()
    for item in "${batch[@]}"; do "$func" "$item" & pids+=($!); done
    for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed+=("${batch[$i]}"); done
  done
  (( ${#failed[@]} == 0 )) || die "$func failed for: ${failed[*]} (logs in $out/logs/)"
}

train_base() {  # seed
  local seed=$1
  "$keel" train --config "$config" --run-dir "$out/base-seed$seed" --set "data.dir=$data_dir" \
    --set "train.seed=$seed" --set "data.seed=$seed" > "$out/logs/base-seed$seed.log" 2>&1 ||
    { tail -5 "$out/logs/base-seed$seed.log"; return 1; }
}
seed_list=($(seq 1 "$seeds"))
say "training ${#seed_list[@]} base runs (seeds ${seed_list[*]}), $jobs at a time"
run_parallel train_base "${seed_list[@]}"

branch_step=$(sed -n '/^\[train\]/,/^\[/p' "$out/base-seed1/config.ini" | grep -E '^\s*steps\s*=' | sed -E 's/^[^=]*=\s*([0-9]+).*/\1/')
end_step=$(sed -n '/^\[optim\]/,/^\[/p' "$out/base-seed1/config.ini" | grep -E '^\s*decay_steps\s*=' | sed -E 's/^[^=]*=\s*([0-9]+).*/\1/')
milestone=$(sed -n '/^\[checkpoint\]/,/^\[/p' "$out/base-seed1/config.ini" | grep -E '^\s*milestone_every\s*=' | sed -E 's/^[^=]*=\s*([0-9]+).*/\1/')
[[ $branch_step =~ ^[0-9]+$ && $end_step =~ ^[0-9]+$ && $milestone =~ ^[1-9][0-9]*$ ]] ||
  die "cannot read train.steps, optim.decay_steps and checkpoint.milestone_every from $out/base-seed1/config.ini"
(( end_step > branch_step )) || die "optim.decay_steps ($end_step) must be beyond the branch point train.steps ($branch_step)"
branch_ckpt_name=$(printf 'step-%08d' "$branch_step")

branch_arm() {  # arm-seedN
  local run=$1 arm=${1%-seed*} seed=${1##*-seed}
  "$keel" resume --from "$out/base-seed$seed/checkpoints/$branch_ckpt_name" --run-dir "$out/$run" \
    --set "train.steps=$end_step" --set "data.mixture=$(arm_mixture "$arm")" > "$out/logs/$run.log" 2>&1 ||
    { tail -5 "$out/logs/$run.log"; return 1; }
}
runs=()
for seed in "${seed_list[@]}"; do for arm in "${arms[@]}"; do runs+=("$arm-seed$seed"); done; done
say "branching ${#runs[@]} arm runs at step $branch_step to step $end_step, $jobs at a time: ${arms[*]}"
run_parallel branch_arm "${runs[@]}"

eval_run() {  # arm-seedN: every milestone checkpoint after the branch point
  local run=$1 ckpt step
  for ckpt in "$out/$run"/checkpoints/step-*; do
    step=$((10#${ckpt##*/step-}))
    (( step > branch_step && step % milestone == 0 )) || continue
    "$keel" eval "$ckpt" --memorization-samples 0 >> "$out/logs/eval-$run.log" 2>&1 ||
      { tail -5 "$out/logs/eval-$run.log"; return 1; }
  done
}
say "evaluating every arm run at the steps after $branch_step divisible by $milestone"
run_parallel eval_run "${runs[@]}"

"$python" "$here/analyze.py" "$out" "$baseline" "${arms[@]}" > "$out/summary.txt"
cat "$out/summary.txt"
echo

run_dirs=()
for run in "${runs[@]}"; do run_dirs+=("$out/$run"); done
if "$keel" report --help > /dev/null 2>&1; then
  "$keel" report "${run_dirs[@]}" -o "$out/report.html" --baseline "$baseline" \
    --title "datamix-ab: text vs code mixture branched at step $branch_step, $seeds seeds" \
    > "$out/logs/report.log" 2>&1 || { tail -5 "$out/logs/report.log"; die "keel report failed"; }
  report_line="report:   $out/report.html"
else
  report_line="report:   not written: this keel has no 'report' command"
fi
say "done"
echo "summary:  $out/summary.txt"
echo "$report_line"
echo "runs:     $out/<arm>-seed<N> (arms ${arms[*]}; bases $out/base-seed<N>)"
echo "logs:     $out/logs/"
