#!/usr/bin/env bash
# Why: K2-65B's team resumed from checkpoints before its loss spikes with stability fixes; this is that workflow
# at a size one CPU trains in minutes, in one command. A control run meets a misbehaving data chunk (fed at a
# known step by data.schedule, see k2.ini) and spikes; arms resume from the control's last checkpoint before the
# spike, each with one stability plugin, plus a `clean` arm that resumes without the bad chunk (the reference
# for "recovered"). Then every arm is evaluated at fixed steps (keel eval), the verdict is written to
# summary.txt (analyze.py) and the charts to report.html (keel report).
#
#   experiments/k2-spike-resume/run.sh [--tiny] [--out DIR]
#
# --tiny: the CI size (k2-tiny.ini, ~1 minute). --out: output directory (default runs/k2-spike-resume-<time>);
# an existing one is refused. Environment: KEEL_BIN (a built keel; default: build it with scripts/build.sh),
# KEEL_JOBS (runs side by side, default 2), PYTHON (a python3 with h5py).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
xp_name=k2-spike-resume
# shellcheck source=../lib.sh
source "$here/../lib.sh"

tiny=0
out=""
while (( $# )); do
  case $1 in
    --tiny) tiny=1; shift ;;
    --out) (( $# >= 2 )) || die "--out needs a directory"; out=$2; shift 2 ;;
    --out=*) out=${1#--out=}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
config=$here/k2.ini
(( tiny )) && config=$here/k2-tiny.ini
[ -n "$out" ] || out=$repo/runs/k2-spike-resume-$( (( tiny )) && echo tiny- )$(date +%Y%m%d-%H%M%S)
check_out_and_jobs "$out"
find_python
find_keel "$repo"

mkdir -p "$out/logs" "$out/data"
out=$(cd "$out" && pwd)

# The misbehaving chunk and the prepared corpus (prose + code + bad) live in the output dir: the experiment's
# tokenizer differs from the bundled corpus's (it has seen the bad chunk's characters).
"$python" "$here/make_bad_chunk.py" "$out/data/bad_chunk.txt"
data=(--set "data.dir=$out/data/prepared" --set "source.bad.inputs=$out/data/bad_chunk.txt")
say "preparing data in $out/data/prepared"
"$keel" data prepare --config "$config" "${data[@]}" > "$out/logs/prepare.log" 2>&1 ||
  { tail -5 "$out/logs/prepare.log"; die "keel data prepare failed (log: $out/logs/prepare.log)"; }

say "training the control arm (log: $out/logs/control.log)"
"$keel" train --config "$config" --run-dir "$out/control" "${data[@]}" > "$out/logs/control.log" 2>&1 ||
  { tail -5 "$out/logs/control.log"; die "the control run failed (log: $out/logs/control.log)"; }
"$python" "$here/analyze.py" resume-point "$out/control" > "$out/resume_point.txt"
read -r spike_step resume_ckpt < "$out/resume_point.txt"
say "control spiked at step $spike_step; arms resume from $resume_ckpt"

# The arms: everything as the control except what the arm names. checkpoint.every=10 gives rollback_skip a
# checkpoint of its own right before the spike (it rolls back within its run dir); the other arms get the same
# setting so that every arm writes the same checkpoints.
clean_schedule=$(config_value "$out/control/config.ini" data mixture)
arm_args() {
  case $1 in
    clean) echo "--set data.schedule=0:$clean_schedule" ;;   # no bad chunk: the reference
    zscore_skip) echo "--plugin spike_handler=zscore_skip" ;;
    rollback_skip) echo "--plugin spike_handler=rollback_skip" ;;
    embedding_grad_shrink) echo "--plugin grad_transform=embedding_grad_shrink" ;;
    # update_clip runs after global-norm clipping (optim.grad_clip = 1), which already scales the spike's
    # gradient down ~30x; per-tensor RMS is then 1e-4..1e-2 before the chunk and at most 2-5x that during it.
    # 2e-3 clips the chunk's largest tensors and a few ordinary ones (summary.txt counts them).
    update_clip) echo "--plugin grad_transform=update_clip --plugin-arg update_clip.max_rms=2e-3" ;;
    *) die "unknown arm $1" ;;
  esac
}
arms=(clean zscore_skip rollback_skip embedding_grad_shrink update_clip)
resume_arm() {
  local arm=$1
  # shellcheck disable=SC2046  # arm_args is a list of words without spaces in them
  "$keel" resume --from "$resume_ckpt" --run-dir "$out/$arm" --set checkpoint.every=10 $(arm_args "$arm") \
    > "$out/logs/$arm.log" 2>&1 || { tail -5 "$out/logs/$arm.log"; return 1; }
}
say "resuming ${#arms[@]} arms, $jobs at a time: ${arms[*]}"
run_parallel resume_arm "${arms[@]}"

# Validation loss per source at the milestone checkpoints after the resume point, the same steps in every arm.
resume_step=$((10#${resume_ckpt##*/step-}))
milestone=$(config_int "$out/control/config.ini" checkpoint milestone_every)
(( milestone > 0 )) || die "checkpoint.milestone_every must be > 0 in $out/control/config.ini"
eval_arm() { eval_milestones "$out/$1" "$resume_step" "$milestone"; }
say "evaluating every arm at the steps after $resume_step divisible by $milestone"
run_parallel eval_arm control "${arms[@]}"

"$python" "$here/analyze.py" summary "$out" control "${arms[@]}" > "$out/summary.txt"
cat "$out/summary.txt"
echo

run_dirs=("$out/control")
for arm in "${arms[@]}"; do run_dirs+=("$out/$arm"); done
write_report control "k2-spike-resume: a bad data chunk, and resuming before it with stability plugins" \
  "${run_dirs[@]}"
report_done
echo "runs:     ${run_dirs[*]}"
echo "logs:     $out/logs/"
