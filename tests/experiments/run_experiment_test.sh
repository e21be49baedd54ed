#!/usr/bin/env bash
# Why: one ctest per flagship experiment. Runs `experiments/NAME/run.sh --tiny` exactly as a user would (with the
# build's keel and, for datamix-ab, the tests' prepared corpus), then checks what the experiment promises: the
# summary with its verdict, every arm's run dir with metrics.h5 (and eval files where the experiment evaluates), a
# non-empty report.html, and for k2-spike-resume that the control really spiked and the tournament named a verdict
# consistent with its interval; for datamix-ab that every arm has at least 3 seeds.
#   run_experiment_test.sh NAME SOURCE_DIR KEEL_BIN OUT_DIR TEST_DATA_DIR
set -euo pipefail
(( $# == 5 )) || { echo "usage: run_experiment_test.sh NAME SOURCE_DIR KEEL_BIN OUT_DIR TEST_DATA_DIR" >&2; exit 2; }
name=$1 src=$2 keel=$3 out=$4 test_data=$5
fail() { echo "FAIL [$name]: $*" >&2; exit 1; }

rm -rf "$out"  # this test's own output dir from an earlier run; run.sh refuses to overwrite one
case $name in
  k2-spike-resume) KEEL_BIN=$keel bash "$src/experiments/$name/run.sh" --tiny --out "$out" ;;
  datamix-ab) KEEL_BIN=$keel KEEL_DATA_DIR=$test_data bash "$src/experiments/$name/run.sh" --tiny --out "$out" ;;
  *) fail "unknown experiment" ;;
esac

# Running it again into the same dir must be refused, leaving the results alone.
if KEEL_BIN=$keel bash "$src/experiments/$name/run.sh" --tiny --out "$out" > "$out.again.log" 2>&1; then
  fail "a second run into $out was not refused"
fi
grep -q "already exists" "$out.again.log" || fail "the refusal does not say why: $(cat "$out.again.log")"
rm -f "$out.again.log"

summary=$out/summary.txt
[ -s "$summary" ] || fail "no summary at $summary"
[ -s "$out/report.html" ] || fail "no report at $out/report.html"
grep -q "<html" "$out/report.html" || fail "$out/report.html is not HTML"

python=""
for candidate in python3 /usr/bin/python3; do
  if "$candidate" -c "import h5py" 2>/dev/null; then python=$candidate; break; fi
done
[ -n "$python" ] || fail "no python3 with h5py"
# A run dir passes when its metrics.h5 has rows and, for an evaluated run, its eval files name a step.
check_run() {
  local run=$1 min_evals=$2
  [ -s "$run/metrics.h5" ] || fail "$run/metrics.h5 is missing"
  "$python" - "$run" "$min_evals" <<'PY' || fail "$1 has no usable metrics or evals"
import glob, sys, h5py
run, min_evals = sys.argv[1], int(sys.argv[2])
with h5py.File(f"{run}/metrics.h5", "r") as f:
    assert len(f["/train/loss"]) > 0, f"{run}: no /train/loss rows"
evals = sorted(glob.glob(f"{run}/eval/step-*.h5"))
assert len(evals) >= min_evals, f"{run}: {len(evals)} eval files, expected at least {min_evals}"
for path in evals:
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] in ("keel-eval", b"keel-eval") and len(f["/validation"]) >= 2, path
PY
}

case $name in
  k2-spike-resume)
    grep -q "^SPIKE: yes" "$summary" || fail "the control did not spike: $(head -5 "$summary")"
    jump=$(sed -n 's/^SPIKE: yes:.*(jump +\([0-9.]*\)).*/\1/p' "$summary")
    "$python" -c "import sys; sys.exit(0 if float('$jump') > 2.0 else 1)" || fail "the control's loss jump $jump is < 2"
    check_run "$out/control" 0
    # The tournament: every arm of arms.ini a run dir, a row in the table, and a verdict with its interval.
    for arm in baseline skip_batch lr_cooldown rollback reset_moments raise_eps update_clip; do
      check_run "$out/tournament/$arm-seed0" 0
      grep -qE "^$arm +[0-9]" "$summary" || fail "the summary has no row for $arm"
    done
    grep -qE "^(winner: [a-z_]+|no clear winner: )" "$summary" || fail "the summary names no verdict"
    "$python" - "$out/tournament/tournament.json" <<'PY' || fail "tournament.json is not what the summary says"
import json, sys
t = json.load(open(sys.argv[1]))
assert t["measure_kind"] == "heldout" and len(t["arms"]) == 7, t["measure"]
lo, hi = t["winner_vs_runner_up"]["ci95"]
assert (t["winner"] is not None) == (hi < 0), (t["winner"], lo, hi)
# The skip handlers acted on the bad chunk: skip_batch skipped updates, rollback rolled back.
import h5py
with h5py.File(t["out"] + "/skip_batch-seed0/metrics.h5", "r") as f:
    assert f["/train/skipped"][:].sum() > 0, "skip_batch skipped nothing"
with h5py.File(t["out"] + "/rollback-seed0/metrics.h5", "r") as f:
    assert any(k == b"rollback" for _, k, _ in f["/events"][:]), "rollback never rolled back"
PY
    ;;
  datamix-ab)
    grep -qE "^SEEDS: ([3-9]|[1-9][0-9]+) per arm" "$summary" || fail "fewer than 3 seeds per arm: $(grep SEEDS "$summary")"
    for arm in text even code; do
      for seed in 1 2 3; do check_run "$out/$arm-seed$seed" 2; done
    done
    for arm in even code; do
      grep -qE "^    $arm +loss [0-9.]+ ± [0-9.]+ +diff [-+][0-9.]+ ± [0-9.]+" "$summary" ||
        fail "no difference with spread for arm $arm in the summary"
    done
    ;;
esac
echo "PASS [$name]: summary $summary, report $out/report.html"
