#!/usr/bin/env bash
# Why: the README's first command. Set-up, build, prepare the bundled corpus, train the default small model,
# and say where the results are. Extra arguments go to `keel train` (e.g. --set train.steps=100).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh --target keel
config=experiments/small.ini
./build/bin/keel data prepare --config "$config"
run_dir=${KEEL_RUN_DIR:-runs/small-$(date +%Y%m%d-%H%M%S)}
./build/bin/keel train --config "$config" --run-dir "$run_dir" "$@"
./build/bin/keel inspect "$run_dir"
echo
echo "run dir:     $run_dir"
echo "metrics:     $run_dir/metrics.h5   (h5dump -d /train/loss $run_dir/metrics.h5)"
echo "log:         $run_dir/train.log"
echo "checkpoints: $run_dir/checkpoints   (continue: ./build/bin/keel resume --from $run_dir --run-dir NEW_DIR --set train.steps=N)"
