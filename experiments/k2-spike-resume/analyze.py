#!/usr/bin/env python3
"""Why: run.sh needs two answers about the control run that Keel's console output does not give, both read
straight from the files a run leaves (docs/metrics.md), so that anyone can check them with h5py; the comparison of
the remediations is `keel tournament`'s (tournament.json), not this script's.

  analyze.py resume-point CONTROL_RUN_DIR
      Finds the control's spike with the rule zscore_skip uses (loss more than 6 standard deviations above the
      mean of the last 50 steps, once 10 are in the window; a non-finite loss always counts) and prints
      "SPIKE_STEP CHECKPOINT_DIR": the control's newest checkpoint at least 10 steps before the spike, so that a
      z-score handler that starts there has its 10 steps of history when the spike comes. Exit 1 with a message
      when the control did not spike (the experiment would show nothing).

  analyze.py spike CONTROL_RUN_DIR
      One line for summary.txt: "SPIKE: yes: ..." with the loss before the bad chunk (median of the 20 steps
      before it), its peak in the chunk, the jump and the grad norms; "SPIKE: no: ..." when there was none.

Loss per step: the last row of a step in /train is authoritative (a rollback appends the replayed steps again)."""
import configparser
import glob
import math
import os
import re
import statistics
import sys

import h5py

WINDOW, MIN_HISTORY, THRESHOLD = 50, 10, 6.0  # zscore_skip's defaults (plugins/common/spike_window.h)


def read_config(run_dir):
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#", ";"), inline_comment_prefixes=("#",))
    parser.optionxform = str
    path = os.path.join(run_dir, "config.ini")
    if not parser.read(path):
        sys.exit(f"analyze.py: cannot read {path}")
    return parser


def bad_window(config):
    """[first, end) steps of the data.schedule stage that feeds source `bad`."""
    stages = []
    for stage in config.get("data", "schedule", fallback="").split(";"):
        if not stage.strip():
            continue
        start, weights = stage.split(":", 1)
        w = {k.strip(): float(v) for k, v in (kv.split("=") for kv in weights.split(","))}
        stages.append((int(start), w))
    for i, (start, w) in enumerate(stages):
        if w.get("bad", 0) > 0:
            end = stages[i + 1][0] if i + 1 < len(stages) else config.getint("train", "steps")
            return start, end
    sys.exit("analyze.py: data.schedule has no stage that feeds source `bad`")


def read_run(run_dir):
    """{step: (loss, grad_norm)}, later rows winning."""
    path = os.path.join(run_dir, "metrics.h5")
    if not os.path.exists(path):
        sys.exit(f"analyze.py: {path} is missing")
    with h5py.File(path, "r") as f:
        steps, loss, gnorm = f["/train/step"][:], f["/train/loss"][:], f["/train/grad_norm"][:]
    return {int(s): (float(l), float(g)) for s, l, g in zip(steps, loss, gnorm)}


def detect_spike(rows):
    """First step whose loss z-score against the last WINDOW steps exceeds THRESHOLD."""
    window = []
    for step in sorted(rows):
        x = rows[step][0]
        if not math.isfinite(x):
            return step
        if len(window) >= MIN_HISTORY:
            mean, sd = statistics.fmean(window), statistics.pstdev(window)
            if sd > 0 and (x - mean) / sd > THRESHOLD:
                return step
        window = (window + [x])[-WINDOW:]
    return None


def checkpoints(run_dir):
    found = []
    for d in glob.glob(os.path.join(run_dir, "checkpoints", "step-*")):
        m = re.fullmatch(r"step-(\d+)", os.path.basename(d))
        if m and os.path.exists(os.path.join(d, "manifest.json")):
            found.append((int(m.group(1)), d))
    return sorted(found)


def resume_point(control_dir):
    spike = detect_spike(read_run(control_dir))
    if spike is None:
        sys.exit(f"analyze.py: the control run {control_dir} has no loss spike (z-score > {THRESHOLD}): nothing to resume from")
    before = [(s, d) for s, d in checkpoints(control_dir) if s <= spike - MIN_HISTORY]
    if not before:
        sys.exit(f"analyze.py: {control_dir} has no checkpoint at or before step {spike - MIN_HISTORY} (spike at step {spike})")
    print(spike, before[-1][1])


def spike_line(control_dir):
    rows = read_run(control_dir)
    first, end = bad_window(read_config(control_dir))
    spike = detect_spike(rows)
    if spike is None:
        print(f"SPIKE: no: the control's loss never exceeded a z-score of {THRESHOLD:g} (the experiment shows nothing)")
        return
    pre = [rows[s] for s in range(first - 20, first) if s in rows]
    peak = max((s for s in range(first, end) if s in rows), key=lambda s: rows[s][0])
    pre_loss = statistics.median(l for l, _ in pre)
    print(f"SPIKE: yes: control spike detected at step {spike}; source `bad` fed at steps {first}-{end - 1}; loss "
          f"{pre_loss:.3f} (median of the 20 steps before) -> {rows[peak][0]:.3f} at step {peak} (jump "
          f"{rows[peak][0] - pre_loss:+.3f}); grad norm {statistics.median(g for _, g in pre):.3f} -> "
          f"{max(rows[s][1] for s in range(first, end) if s in rows):.3f}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "resume-point":
        resume_point(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "spike":
        spike_line(sys.argv[2])
    else:
        sys.exit("usage: analyze.py resume-point CONTROL_RUN_DIR | analyze.py spike CONTROL_RUN_DIR")


if __name__ == "__main__":
    main()
