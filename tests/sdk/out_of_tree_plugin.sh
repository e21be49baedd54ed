#!/usr/bin/env bash
# Why: the promise to plugin authors, end to end: `cmake --install` gives a prefix with keel, the built-in
# plugins and the KeelSDK package; a plugin that knows nothing of Keel's source tree (sdk/examples/loss_guard)
# builds against that prefix with find_package(KeelSDK) + keel_add_plugin, and the *installed* keel trains with
# it, loaded by path. usage: out_of_tree_plugin.sh BUILD_DIR SOURCE_DIR TEST_DATA_DIR
set -euo pipefail
build=$1 source=$2 data=$3
work=$(mktemp -d "${TMPDIR:-/tmp}/keel-sdk-XXXXXX")
trap 'rm -rf "$work"' EXIT
cmake --install "$build" --prefix "$work/prefix" > "$work/install.log"
cp -r "$source/sdk/examples/loss_guard" "$work/loss_guard"
torch_dir=$(cmake -L -N "$build" | sed -n 's/^Torch_DIR:PATH=//p')
cmake -S "$work/loss_guard" -B "$work/loss_guard/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$work/prefix;$torch_dir" > "$work/configure.log"
cmake --build "$work/loss_guard/build" > "$work/build.log"
plugin="$work/loss_guard/build/keel_plugin_loss_guard.so"
test -f "$plugin"
# The installed keel finds its installed plugins (read from `keel plugins --json`, never from the human listing).
"$work/prefix/bin/keel" plugins --json | /usr/bin/python3 -c 'import json, sys
found = json.load(sys.stdin)["plugins"]
assert any(p["name"] == "adamw" and p["version"] == "1.0" for p in found), found'
"$work/prefix/bin/keel" train --config "$source/experiments/tiny.ini" --set data.dir="$data" --set train.steps=3 \
  --run-dir "$work/run" --plugin spike_handler="$plugin" --plugin-arg loss_guard.max_loss=7.5 > "$work/train.log" 2>&1 \
  || { cat "$work/train.log"; exit 1; }
# The run loaded that very file (its lineage.json records every plugin library with its version and path).
/usr/bin/python3 - "$work/run/lineage.json" "$plugin" <<'PY' || { cat "$work/train.log"; exit 1; }
import json, os, sys
records = json.load(open(sys.argv[1]))["plugins"]
assert any(r["name"] == "loss_guard" and r["version"] == "1.0" and r["slot"] == "spike_handler"
           and os.path.realpath(r["path"]) == os.path.realpath(sys.argv[2]) for r in records), records
PY
# Step 0's loss (~7.6) is above 7.5: the plugin skipped that update, logged through the SDK.
/usr/bin/python3 - "$work/run/metrics.h5" <<'PY'
import sys, h5py
f = h5py.File(sys.argv[1], "r")
assert "loss_guard.headroom" in f["train/extra"], list(f["train/extra"])
assert f["train/skipped"][0] == 1, f["train/skipped"][:]
kinds = [e[1].decode() for e in f["events"][:]]
assert "skip" in kinds, kinds
PY
echo "out-of-tree plugin: built against the installed SDK, loaded by path, skipped step 0"
