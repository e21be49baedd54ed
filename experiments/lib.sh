# Why: what every experiments/*/run.sh does the same way, in one place: errors and usage, finding a python3 with
# h5py and a built keel, refusing an existing output dir, running a function over items N at a time, evaluating
# a run's milestone checkpoints, reading a key from a run's config.ini (through `keel config show --json`), and
# writing the report. Sourced, never run.
# The caller sets `xp_name` (for messages) before sourcing, and `out`, `jobs` before using what needs them.

die() { echo "$xp_name: error: $*" >&2; exit 1; }
# Prints the script's usage block: its header comment from the line "#   experiments/..." on.
usage() { awk '/^#   experiments\//{p=1} p && /^#/{sub(/^# ?/, ""); print; next} p{exit}' "$0"; }
say() { echo "[$xp_name $(( $(date +%s) - xp_start ))s] $*"; }
xp_start=$(date +%s)

# Sets `python`: $PYTHON, else the first of python3 and /usr/bin/python3 (Debian's python3-h5py) with h5py.
find_python() {
  python=""
  local candidate
  for candidate in ${PYTHON:-python3 /usr/bin/python3}; do
    if "$candidate" -c "import h5py" 2>/dev/null; then python=$candidate; return; fi
  done
  die "no python3 with h5py (tried: ${PYTHON:-python3 /usr/bin/python3}; Debian: apt-get install python3-h5py)"
}

# Sets `keel`: $KEEL_BIN, else the repo's build (built now if needed).
find_keel() {  # REPO
  if [ -n "${KEEL_BIN:-}" ]; then
    keel=$KEEL_BIN
  else
    (cd "$1" && bash scripts/build.sh --target keel)
    keel=$1/build/bin/keel
  fi
  [ -x "$keel" ] || die "keel binary not found or not executable: $keel"
}

# Refuses an existing DIR (results are never overwritten) and checks KEEL_JOBS; sets `jobs`.
check_out_and_jobs() {  # DIR
  [ -e "$1" ] && die "$1 already exists; pass a new --out (results are never overwritten)"
  jobs=${KEEL_JOBS:-2}
  [[ $jobs =~ ^[1-9][0-9]*$ ]] || die "KEEL_JOBS must be a positive integer, got '$jobs'"
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

# The value of SECTION.KEY in a config file (a run's config.ini), as `keel config show --json` resolves it, or an
# error naming both. Needs `keel` and `python` (find_keel, find_python).
config_value() {  # CONFIG_INI SECTION KEY
  local value
  value=$("$keel" config show --config "$1" --json | "$python" -c '
import json, sys
value = json.load(sys.stdin)["config"][sys.argv[1]][sys.argv[2]]
print(str(value).lower() if isinstance(value, bool) else value)' "$2" "$3") || die "cannot read $2.$3 from $1"
  echo "$value"
}
# The same for an integer key.
config_int() {  # CONFIG_INI SECTION KEY
  local value
  value=$(config_value "$@")
  [[ $value =~ ^[0-9]+$ ]] || die "$2.$3 in $1 is '$value', expected an integer"
  echo "$value"
}

# keel eval on every checkpoint of RUN_DIR after step AFTER whose step is divisible by EVERY (log: logs/eval-NAME).
eval_milestones() {  # RUN_DIR AFTER EVERY
  local run_dir=$1 after=$2 every=$3 ckpt step log="$out/logs/eval-$(basename "$1").log"
  for ckpt in "$run_dir"/checkpoints/step-*; do
    step=$((10#${ckpt##*/step-}))
    (( step > after && step % every == 0 )) || continue
    "$keel" eval "$ckpt" --memorization-samples 0 >> "$log" 2>&1 || { tail -5 "$log"; return 1; }
  done
}

# keel report of RUN_DIR... into $out/report.html, and its A/B table as JSON into $out/ab.json (`keel report
# --json`: the statistics a summary reads instead of computing its own).
write_report() {  # BASELINE TITLE RUN_DIR...
  local baseline=$1 title=$2
  shift 2
  "$keel" report "$@" -o "$out/report.html" --baseline "$baseline" --title "$title" --json > "$out/ab.json" \
    2> "$out/logs/report.log" ||
    { tail -5 "$out/logs/report.log"; die "keel report failed (log: $out/logs/report.log)"; }
}

# The closing lines every experiment prints.
report_done() {
  say "done"
  echo "summary:  $out/summary.txt"
  echo "report:   $out/report.html"
}
