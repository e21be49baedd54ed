#!/usr/bin/env bash
# Why: K2-65B's team resumed from checkpoints before its loss spikes with stability fixes; this is that workflow
# at a size one CPU trains in minutes, in one command. A control run meets a misbehaving data chunk (fed at a
# known step by data.schedule, see k2.ini) and spikes; `keel tournament` then resumes the control's last
# checkpoint before the spike once per remediation of arms.ini, on paired data, measures every arm's held-out NLL
# and names the winner with a paired bootstrap interval. summary.txt holds the spike and the tournament's table,
# report.html the curves of the control and every arm (keel report).
#
#   experiments/k2-spike-resume/run.sh [--tiny] [--out DIR]
#
# --tiny: the CI size (k2-tiny.ini, under a minute). --out: output directory (default
# runs/k2-spike-resume-<time>); an existing one is refused. Environment: KEEL_BIN (a built keel; default: build it
# with scripts/build.sh), KEEL_JOBS (arms side by side, default 2), PYTHON (a python3 with h5py).
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
config=$here/k2.ini steps=60  # the arms train from the resume point (240) to step 300
(( tiny )) && config=$here/k2-tiny.ini steps=30  # from 120 to 150
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

say "training the control (log: $out/logs/control.log)"
"$keel" train --config "$config" --run-dir "$out/control" "${data[@]}" > "$out/logs/control.log" 2>&1 ||
  { tail -5 "$out/logs/control.log"; die "the control run failed (log: $out/logs/control.log)"; }
"$python" "$here/analyze.py" resume-point "$out/control" > "$out/resume_point.txt"
read -r spike_step resume_ckpt < "$out/resume_point.txt"
say "control spiked at step $spike_step; the arms of arms.ini resume from $resume_ckpt for $steps steps"

"$keel" tournament --from "$resume_ckpt" --arms "$here/arms.ini" --steps "$steps" --jobs "$jobs" \
  --out "$out/tournament" > "$out/logs/tournament.log" 2>&1 ||
  { tail -8 "$out/logs/tournament.log"; die "keel tournament failed (log: $out/logs/tournament.log)"; }

{ "$python" "$here/analyze.py" spike "$out/control"; echo; cat "$out/tournament/tournament.txt"; } > "$out/summary.txt"
cat "$out/summary.txt"
echo

run_dirs=("$out/control")
for dir in "$out"/tournament/*-seed*/; do run_dirs+=("${dir%/}"); done
write_report baseline "k2-spike-resume: a bad data chunk, and a tournament of remediations resumed before it" \
  "${run_dirs[@]}"
report_done
echo "tournament: $out/tournament/tournament.json"
echo "runs:     ${run_dirs[*]}"
echo "logs:     $out/logs/ and $out/tournament/logs/"
