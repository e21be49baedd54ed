#!/usr/bin/env python3
"""Writes the seed corpus of fuzz_manifest: small, valid manifests in Keel's layout (docs/checkpoints.md).

usage: python3 tests/fuzz/make_manifest_seeds.py   (run from anywhere)
fuzz_checkpoint_h5's seeds are plain random bytes: its input is a program, not a file (fuzz_checkpoint_h5.cpp).
"""
import json
import os


here = os.path.dirname(os.path.abspath(__file__))


def manifests(folder):
    base = {"format": "keel-checkpoint", "format_version": 1, "keel_version": "0.1.0", "step": 100,
            "created": "2026-11-22T00:00:00Z", "run_id": "run-seed",
            "layout": {"dp": 1, "tp": 1, "pp": 1, "world_size": 1}, "config_hash": "0" * 64,
            "model": {"model.layers": "2"}, "data_fingerprint": {"vocab": 2048}, "lineage": {"run_id": "run-seed"},
            "files": [{"name": "rank-00000.h5", "rank": 0, "bytes": 4096, "sha256": "a" * 64},
                      {"name": "config.ini", "rank": -1, "bytes": 10, "sha256": "b" * 64}]}
    with open(os.path.join(folder, "single_rank.json"), "w") as f:
        json.dump(base, f, indent=2)
    two = dict(base, layout={"dp": 2, "tp": 1, "pp": 1, "world_size": 2})
    two["files"] = base["files"] + [{"name": "rank-00001.h5", "rank": 1, "bytes": 4096, "sha256": "c" * 64}]
    with open(os.path.join(folder, "two_ranks.json"), "w") as f:
        json.dump(two, f)


os.makedirs(os.path.join(here, "corpus", "fuzz_manifest"), exist_ok=True)
manifests(os.path.join(here, "corpus", "fuzz_manifest"))
