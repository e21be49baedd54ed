#!/usr/bin/env bash
# Why: CrystalCoder moved its mixture from text to code in stages; whether such a change helps is an A/B question
# that needs paired arms and more than one seed. Per seed N this trains a base run (train.seed = data.seed = N)
# on a text-heavy mix to an intermediate checkpoint, branches one arm per mixture from that checkpoint (only
# data.mixture differs; same weights, optimizer state and data order), evaluates every arm's per-source
# validation loss at fixed steps (keel eval), and reports arm-minus-baseline differences with their spread over
# seeds (report.html and the A/B table ab.json from keel report, summary.txt from analyze.py reading ab.json).
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
xp_name=datamix-ab
# shellcheck source=../lib.sh
source "$here/../lib.sh"

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
check_out_and_jobs "$out"
find_python
find_keel "$repo"

mkdir -p "$out/logs"
out=$(cd "$out" && pwd)

if [ -n "${KEEL_DATA_DIR:-}" ]; then
  [ -f "$KEEL_DATA_DIR/prepared.json" ] || die "KEEL_DATA_DIR=$KEEL_DATA_DIR holds no prepared corpus (prepared.json)"
  data_dir=$(cd "$KEEL_DATA_DIR" && pwd)
else
  data_dir=$repo/data/bundled
  say "preparing data in $data_dir (once; later runs find it up to date)"
  (cd "$repo" && "$keel" data prepare --config "$config" --set "data.dir=$data_dir") > "$out/logs/prepare.log" 2>&1 ||
    { tail -5 "$out/logs/prepare.log"; die "keel data prepare failed (log: $out/logs/prepare.log)"; }
fi

train_base() {  # seed
  local seed=$1
  "$keel" train --config "$config" --run-dir "$out/base-seed$seed" --set "data.dir=$data_dir" \
    --set "train.seed=$seed" --set "data.seed=$seed" > "$out/logs/base-seed$seed.log" 2>&1 ||
    { tail -5 "$out/logs/base-seed$seed.log"; return 1; }
}
seed_list=($(seq 1 "$seeds"))
say "training ${#seed_list[@]} base runs (seeds ${seed_list[*]}), $jobs at a time"
run_parallel train_base "${seed_list[@]}"

branch_step=$(config_int "$out/base-seed1/config.ini" train steps)
end_step=$(config_int "$out/base-seed1/config.ini" optim decay_steps)
milestone=$(config_int "$out/base-seed1/config.ini" checkpoint milestone_every)
(( milestone > 0 )) || die "checkpoint.milestone_every must be > 0 in $out/base-seed1/config.ini"
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

eval_run() { eval_milestones "$out/$1" "$branch_step" "$milestone"; }  # arm-seedN
say "evaluating every arm run at the steps after $branch_step divisible by $milestone"
run_parallel eval_run "${runs[@]}"

# The report, and its A/B table as JSON (ab.json), whose statistics summary.txt prints.
run_dirs=()
for run in "${runs[@]}"; do run_dirs+=("$out/$run"); done
write_report "$baseline" "datamix-ab: text vs code mixture branched at step $branch_step, $seeds seeds" \
  "${run_dirs[@]}"
"$python" "$here/analyze.py" "$out" "$out/ab.json" > "$out/summary.txt"
cat "$out/summary.txt"
echo
report_done
echo "runs:     $out/<arm>-seed<N> (arms ${arms[*]}; bases $out/base-seed<N>)"
echo "logs:     $out/logs/"
