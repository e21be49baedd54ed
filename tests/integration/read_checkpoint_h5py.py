#!/usr/bin/env python3
"""Reads a Keel checkpoint with h5py and the standard library only: no Keel code.

usage: read_checkpoint_h5py.py CHECKPOINT_DIR

It verifies every file against manifest.json (SHA-256), then prints the step, the model and optimizer tensors
with dtype and shape, the data ledger and the lineage. docs/checkpoints.md shows the same code; the test suite
runs this script on a fresh checkpoint so the documentation cannot drift from the format.
"""
import hashlib
import json
import os
import sys

import h5py


def main(ckpt):
    manifest = json.load(open(os.path.join(ckpt, "manifest.json")))
    for f in manifest["files"]:
        digest = hashlib.sha256(open(os.path.join(ckpt, f["name"]), "rb").read()).hexdigest()
        assert digest == f["sha256"], f"{f['name']}: checksum mismatch"
    print(f"step {manifest['step']}, layout {manifest['layout']}, run {manifest['run_id']}")

    with h5py.File(os.path.join(ckpt, "rank-00000.h5"), "r") as h5:
        assert h5.attrs["format"] == b"keel-checkpoint-rank"
        print("model:")
        for name, ds in h5["model"].items():
            print(f"  {name} {ds.attrs['dtype'].decode()} {ds.shape}")
        print(f"optimizer: {h5['optimizer'].attrs['name'].decode()} step {h5['optimizer'].attrs['step']}")
        moments = []
        h5["optimizer/state"].visititems(lambda n, o: moments.append(n) if isinstance(o, h5py.Dataset) else None)
        print(f"  {len(moments)} state tensors, e.g. {moments[0]}")
        embed = h5["model/embed.weight"][()]  # numpy float32 array
        print(f"embed.weight mean {embed.mean():.6f}")
        ledger = json.loads(h5["data/ledger"][()])
        print(f"data ledger: step {ledger['step']}, sources {[s['name'] for s in ledger['sources']]}")
        lineage = json.loads(h5["lineage"][()])
        print(f"lineage: run {lineage['run_id']} kind {lineage['kind']}")
        config = h5["config"][()].decode()
        assert "[model]" in config
        print(f"rng/cpu: {h5['rng/cpu'].shape[0]} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
