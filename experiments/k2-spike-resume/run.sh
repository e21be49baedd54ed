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
die() { echo "k2-spike-resume: error: $*" >&2; exit 1; }
usage() { awk '/^#   experiments\//{p=1} p && /^#/{sub(/^# ?/, ""); print; next} p{exit}' "$0"; }

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

mkdir -p "$out/logs" "$out/data"
out=$(cd "$out" && pwd)
start=$(date +%s)
say() { echo "[k2-spike-resume $(( $(date +%s) - start ))s] $*"; }

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
clean_schedule=$(grep -E '^\s*mixture\s*=' "$out/control/config.ini" | head -1 | sed -E 's/^[^=]*=\s*//')
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
say "resuming ${#arms[@]} arms, $jobs at a time: ${arms[*]}"
run_parallel resume_arm "${arms[@]}"

# Validation loss per source at the milestone checkpoints after the resume point, the same steps in every arm.
resume_step=$((10#$(basename "$resume_ckpt" | sed 's/^step-//')))
milestone=$(sed -n '/^\[checkpoint\]/,/^\[/p' "$out/control/config.ini" | grep -E '^\s*milestone_every\s*=' |
            sed -E 's/^[^=]*=\s*([0-9]+).*/\1/')
[[ $milestone =~ ^[1-9][0-9]*$ ]] || die "cannot read checkpoint.milestone_every from $out/control/config.ini"
eval_arm() {
  local arm=$1 ckpt step
  for ckpt in "$out/$arm"/checkpoints/step-*; do
    step=$((10#${ckpt##*/step-}))
    (( step > resume_step && step % milestone == 0 )) || continue
    "$keel" eval "$ckpt" --memorization-samples 0 >> "$out/logs/eval-$arm.log" 2>&1 ||
      { tail -5 "$out/logs/eval-$arm.log"; return 1; }
  done
}
say "evaluating every arm at the steps after $resume_step divisible by $milestone"
run_parallel eval_arm control "${arms[@]}"

"$python" "$here/analyze.py" summary "$out" control "${arms[@]}" > "$out/summary.txt"
cat "$out/summary.txt"
echo

run_dirs=("$out/control")
for arm in "${arms[@]}"; do run_dirs+=("$out/$arm"); done
if "$keel" report --help > /dev/null 2>&1; then
  "$keel" report "${run_dirs[@]}" -o "$out/report.html" --baseline control \
    --title "k2-spike-resume: a bad data chunk, and resuming before it with stability plugins" \
    > "$out/logs/report.log" 2>&1 || { tail -5 "$out/logs/report.log"; die "keel report failed"; }
  report_line="report:   $out/report.html"
else
  report_line="report:   not written: this keel has no 'report' command"
fi
say "done"
echo "summary:  $out/summary.txt"
echo "$report_line"
echo "runs:     ${run_dirs[*]}"
echo "logs:     $out/logs/"
