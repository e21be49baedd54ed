#!/usr/bin/env bash
# Why: docs/plugins.md promises that its reference block is the header's and that its examples work as
# written. The build compiled each example against the SDK alone (tests/sdk/CMakeLists.txt); this checks the
# reference block line by line against sdk/include/keel/plugin.h, then trains with the gradient-transform and
# spike-handler examples loaded by path and reads their metrics back.
# usage: doc_examples.sh SOURCE_DIR KEEL DOC_PLUGIN_DIR EXTRACTED_SOURCES_DIR TEST_DATA_DIR
set -euo pipefail
source_dir=$1 keel=$2 plugins=$3 sources=$4 data=$5
work=$(mktemp -d "${TMPDIR:-/tmp}/keel-doc-examples-XXXXXX")
trap 'rm -rf "$work"' EXIT
/usr/bin/python3 "$source_dir/tests/sdk/docs_examples.py" check "$source_dir/docs/plugins.md" \
  "$source_dir/sdk/include/keel/plugin.h"

# Which built example is which: the plugin name is in the extracted source each library was built from.
clip="" guard=""
for so in "$plugins"/keel_plugin_doc_example_*.so; do
  name=$(basename "$so" .so)
  src="$sources/${name#keel_plugin_}.cpp"
  grep -q '"tensor_clip"' "$src" && clip=$so
  grep -q '"loss_guard"' "$src" && guard=$so
done
if [ -z "$clip" ] || [ -z "$guard" ]; then
  echo "doc examples tensor_clip/loss_guard not built in $plugins"
  exit 1
fi

"$keel" train --config "$source_dir/experiments/tiny.ini" --set data.dir="$data" --set train.steps=3 \
  --run-dir "$work/run" --plugin grad_transform="$clip" --plugin-arg tensor_clip.max_norm=0.001 \
  --plugin spike_handler="$guard" --plugin-arg loss_guard.max_loss=100 > "$work/train.log" 2>&1 \
  || { cat "$work/train.log"; exit 1; }
/usr/bin/python3 - "$work/run/metrics.h5" <<'PY'
import sys, h5py
f = h5py.File(sys.argv[1], "r")
extra = f["train/extra"]
clipped = extra["tensor_clip.clipped_tensors"][:]
assert len(clipped) == 3 and all(c > 0 for c in clipped), clipped       # max_norm 0.001 clips every tensor
assert all(h > 0 for h in extra["loss_guard.headroom"][:]), extra["loss_guard.headroom"][:]
assert not any(f["train/skipped"][:]), f["train/skipped"][:]
PY
# A bad argument is refused with the example's own message and a non-zero exit.
if "$keel" train --config "$source_dir/experiments/tiny.ini" --set data.dir="$data" --set train.steps=1 \
  --run-dir "$work/bad" --plugin grad_transform="$clip" --plugin-arg tensor_clip.max_norm=-1 > "$work/bad.log" 2>&1; then
  echo "a negative max_norm was accepted"; exit 1
fi
grep -q "max_norm must be a finite number > 0" "$work/bad.log" || { cat "$work/bad.log"; exit 1; }
echo "docs/plugins.md: reference matches the header; examples build and train"
