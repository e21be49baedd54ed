#!/usr/bin/env bash
# Why: a refactor of the trainer must not change a single bit of what it computes. This trains a fixed set of
# tiny runs that pass through every stage of the step (fp32 and bf16-mixed; a loss spike, a rollback with a skip
# rule, a resume with an optimizer swap; the 2 x 2 x 2 DP x TP x PP layout under keel launch) and compares their
# fingerprint (tests/golden/golden_summary.py: per-step loss and grad norm as exact hex floats, events, a hash of
# the final weights) with tests/golden/expected.json.
#
# Bits depend on the CPU's instruction set and the BLAS build. expected.json records the machine it was made on
# (expected.machine); on another machine the comparison is reported and skipped (exit 0 with a SKIP line), unless
# KEEL_GOLDEN_STRICT=1. To re-record after an intended change of numerics: KEEL_GOLDEN_RECORD=1 (say why in the
# commit).
#
# usage: golden_run.sh SOURCE_DIR KEEL_BINARY OUT_DIR TEST_DATA_DIR PLUGIN_DIR
set -euo pipefail
source_dir=$1 keel=$2 out=$3 data=$4 plugins=$5
here=$source_dir/tests/golden
rm -rf "$out"
mkdir -p "$out"
common=(--config "$source_dir/experiments/tiny.ini" --set "data.dir=$data" --set train.threads=1
        --set metrics.flush_every=1)
spike=(--plugin "lr_schedule=$plugins/keel_plugin_lr_spike.so" --plugin-arg lr_spike.at_step=9
       --plugin-arg lr_spike.factor=300 --plugin spike_handler=rollback_skip
       --plugin-arg rollback_skip.min_history=6)

for precision in fp32 bf16-mixed; do
  "$keel" train "${common[@]}" --run-dir "$out/$precision" --set train.precision=$precision --set train.steps=14 \
    --set checkpoint.every=4 "${spike[@]}" > "$out/$precision.log" 2>&1
  "$keel" resume --from "$out/$precision/checkpoints/step-00000012" --run-dir "$out/$precision-lion" \
    --set train.steps=16 --plugin optimizer=lion > "$out/$precision-lion.log" 2>&1
done
"$keel" launch --nproc 8 -- "$keel" train "${common[@]}" --run-dir "$out/dp2-tp2-pp2" --set train.steps=4 \
  --set parallel.dp=2 --set parallel.tp=2 --set parallel.pp=2 --set checkpoint.every=4 > "$out/dp2-tp2-pp2.log" 2>&1

/usr/bin/python3 "$here/golden_summary.py" "$out/fp32" "$out/fp32-lion" "$out/bf16-mixed" "$out/bf16-mixed-lion" \
  "$out/dp2-tp2-pp2" > "$out/summary.json"
machine="$(uname -m) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) | $(grep -m1 '^flags' /proc/cpuinfo | grep -o 'avx512[a-z_]*\|avx2\|fma' | sort -u | xargs) | $(dpkg-query -W -f='${Package} ${Version}\n' libopenblas0-pthread libtorch1.13 2>/dev/null | xargs)"
if [ "${KEEL_GOLDEN_RECORD:-0}" = 1 ]; then
  /usr/bin/python3 - "$out/summary.json" "$here/expected.json" "$machine" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
json.dump({"machine": sys.argv[3], "runs": summary}, open(sys.argv[2], "w"), indent=1, sort_keys=True)
PY
  echo "golden: recorded $here/expected.json on: $machine"
  exit 0
fi
/usr/bin/python3 - "$out/summary.json" "$here/expected.json" "$machine" "${KEEL_GOLDEN_STRICT:-0}" <<'PY'
import json, sys
got = json.load(open(sys.argv[1]))
expected = json.load(open(sys.argv[2]))
machine, strict = sys.argv[3], sys.argv[4] == "1"
if expected["machine"] != machine and not strict:
    print(f"golden: SKIP: expected.json was recorded on\n  {expected['machine']}\nthis machine is\n  {machine}")
    sys.exit(0)
bad = []
for run, want in expected["runs"].items():
    have = got.get(run)
    if have is None:
        bad.append(f"{run}: missing")
        continue
    for key in sorted(want):
        if have.get(key) != want[key]:
            where = ""
            if isinstance(want[key], list) and isinstance(have.get(key), list):
                for i, (a, b) in enumerate(zip(want[key], have[key])):
                    if a != b:
                        where = f" (first difference at row {i}: expected {a}, got {b})"
                        break
                else:
                    where = f" (length {len(want[key])} expected, {len(have[key])} got)"
            bad.append(f"{run}.{key} differs{where}")
if bad:
    print("golden: the run is not bit-identical to tests/golden/expected.json:")
    for b in bad:
        print("  " + b)
    sys.exit(1)
print(f"golden: {len(expected['runs'])} runs bit-identical to tests/golden/expected.json")
PY
