#!/usr/bin/env python3
"""Why: the golden run's fingerprint, read with h5py alone: per step the loss, grad norm and skipped flag as exact
hex floats, the event kinds, and a SHA-256 of the final checkpoint's model tensors (raw bytes, every rank file,
sorted by name). Two builds that train bit-identically print the same JSON.

usage: golden_summary.py RUN_DIR... > summary.json"""
import hashlib
import json
import os
import sys

import h5py


def weights_sha256(checkpoint_dir):
    digest = hashlib.sha256()
    for name in sorted(os.listdir(checkpoint_dir)):
        if not (name.startswith("rank-") and name.endswith(".h5")):
            continue
        with h5py.File(os.path.join(checkpoint_dir, name), "r") as f:
            tensors = []
            f["model"].visititems(lambda key, obj: tensors.append(key) if isinstance(obj, h5py.Dataset) else None)
            for key in sorted(tensors):
                digest.update(name.encode() + b"/" + key.encode())
                digest.update(f["model"][key][()].tobytes())
    return digest.hexdigest()


def summarise(run_dir):
    with h5py.File(os.path.join(run_dir, "metrics.h5"), "r") as f:
        train = f["train"]
        steps = [int(s) for s in train["step"][()]]
        out = {
            "steps": steps,
            "loss": [float(x).hex() for x in train["loss"][()]],
            "grad_norm": [float(x).hex() for x in train["grad_norm"][()]],
            "skipped": [int(x) for x in train["skipped"][()]],
            "events": [e["kind"].decode() for e in f["events"][()]],
        }
    checkpoints = os.path.join(run_dir, "checkpoints")
    latest = sorted(d for d in os.listdir(checkpoints) if d.startswith("step-") and "." not in d)[-1]
    out["final_checkpoint"] = latest
    out["weights_sha256"] = weights_sha256(os.path.join(checkpoints, latest))
    return out


if __name__ == "__main__":
    json.dump({os.path.basename(os.path.normpath(d)): summarise(d) for d in sys.argv[1:]}, sys.stdout, indent=1,
              sort_keys=True)
    sys.stdout.write("\n")
