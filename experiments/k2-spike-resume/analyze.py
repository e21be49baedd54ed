#!/usr/bin/env python3
"""Why: run.sh needs two answers it cannot get from Keel's console output, both read straight from the HDF5 files
a run leaves (docs/metrics.md, docs/eval.md), so that anyone can check them with h5py:

  analyze.py resume-point CONTROL_RUN_DIR
      Finds the control arm's spike with the rule zscore_skip uses (loss more than 6 standard deviations above the
      mean of the last 50 steps, once 10 are in the window; a non-finite loss always counts) and prints
      "SPIKE_STEP CHECKPOINT_DIR": the control's newest checkpoint at least 10 steps before the spike, so that a
      z-score handler that starts fresh there has its 10 steps of history when the spike comes. Exit 1 with a
      message when the control did not spike (the experiment would show nothing).

  analyze.py summary OUT_DIR ARM...
      The experiment's verdict (summary.txt): the control's spike, and per arm what it did at the bad chunk
      (skips, rollbacks), its training loss after the chunk against the control and against the `clean` arm
      (same resume point, no bad chunk), and its per-source validation loss from `keel eval`.

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
AFTER = 10  # "just after the chunk": the first AFTER steps after it ends


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


class Run:
    def __init__(self, run_dir):
        self.dir = run_dir
        self.name = os.path.basename(os.path.normpath(run_dir))
        path = os.path.join(run_dir, "metrics.h5")
        if not os.path.exists(path):
            sys.exit(f"analyze.py: {path} is missing")
        with h5py.File(path, "r") as f:
            steps = f["/train/step"][:]
            loss, gnorm, skipped = f["/train/loss"][:], f["/train/grad_norm"][:], f["/train/skipped"][:]
            self.events = [(int(s), k.decode(errors="replace"), t.decode(errors="replace")) for s, k, t in f["/events"][:]]
            self.extra = {}  # plugin metrics: name -> {step: value} (docs/plugins.md: ctx.metric)
            if "/train/extra" in f:
                for name in f["/train/extra"]:
                    if not name.endswith("_step") and name + "_step" in f["/train/extra"]:
                        values, at = f[f"/train/extra/{name}"][:], f[f"/train/extra/{name}_step"][:]
                        self.extra[name] = {int(s): float(v) for s, v in zip(at, values)}
        self.loss, self.gnorm, self.skipped = {}, {}, {}
        for i, s in enumerate(steps):  # later rows win (replayed after a rollback)
            self.loss[int(s)], self.gnorm[int(s)], self.skipped[int(s)] = float(loss[i]), float(gnorm[i]), int(skipped[i])
        self.rows = len(steps)

    def mean_loss(self, first, end):
        values = [self.loss[s] for s in range(first, end) if s in self.loss]
        return statistics.fmean(values) if values else math.nan

    def count(self, kind):
        return sum(1 for _, k, _ in self.events if k == kind)

    def eval_nll(self):
        """{step: {source: nll}} from RUN_DIR/eval/step-N.h5."""
        out = {}
        for path in sorted(glob.glob(os.path.join(self.dir, "eval", "step-*.h5"))):
            with h5py.File(path, "r") as f:
                step = int(f.attrs["step"])
                out[step] = {src: float(f[f"/validation/{src}/nll"][0]) for src in f["/validation"]}
        return out


def detect_spike(run):
    """First step whose loss z-score against the last WINDOW non-spike steps exceeds THRESHOLD."""
    window = []
    for step in sorted(run.loss):
        x = run.loss[step]
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
    run = Run(control_dir)
    spike = detect_spike(run)
    if spike is None:
        sys.exit(f"analyze.py: the control run {control_dir} has no loss spike (z-score > {THRESHOLD}): nothing to resume from")
    before = [(s, d) for s, d in checkpoints(control_dir) if s <= spike - MIN_HISTORY]
    if not before:
        sys.exit(f"analyze.py: {control_dir} has no checkpoint at or before step {spike - MIN_HISTORY} (spike at step {spike})")
    print(spike, before[-1][1])


def fmt(x, signed=False):
    return "n/a" if not math.isfinite(x) else (f"{x:+.3f}" if signed else f"{x:.3f}")


def summary(out_dir, arms):
    runs = {a: Run(os.path.join(out_dir, a)) for a in arms}
    control = runs["control"]
    config = read_config(control.dir)
    first, end = bad_window(config)
    total = config.getint("train", "steps")
    spike = detect_spike(control)
    pre = [control.loss[s] for s in range(first - 20, first) if s in control.loss]
    pre_median = statistics.median(pre)
    peak_step = max(range(first, end), key=lambda s: control.loss.get(s, -math.inf))
    jump = control.loss[peak_step] - pre_median
    lines = [f"k2-spike-resume: {os.path.abspath(out_dir)}",
             f"bad chunk: source `bad` fed at steps {first}-{end - 1} (data.schedule of control/config.ini)"]
    if spike is None:
        lines.append("SPIKE: no: the control's loss never exceeded a z-score of 6 (the experiment shows nothing)")
    else:
        lines.append(f"SPIKE: yes: control spike detected at step {spike}; loss {pre_median:.3f} (median of the 20 "
                     f"steps before) -> {control.loss[peak_step]:.3f} at step {peak_step} (jump {jump:+.3f}); "
                     f"grad norm {statistics.median([control.gnorm[s] for s in range(first - 20, first)]):.3f} -> "
                     f"{max(control.gnorm[s] for s in range(first, end)):.3f}")
    lineage = os.path.join(out_dir, "resume_point.txt")
    if os.path.exists(lineage):
        lines.append("arms resumed from: " + open(lineage).read().split()[1])
    clean = runs.get("clean")
    after = (end, min(end + AFTER, total))
    late = (min(end + AFTER, total), total)
    damage_control = control.mean_loss(*after) - (clean.mean_loss(*after) if clean else math.nan)
    lines += ["",
              f"training loss (mean) just after the chunk = steps {after[0]}-{after[1] - 1}; later = steps "
              f"{late[0]}-{late[1] - 1}. 'damage' = arm minus clean just after the chunk.",
              f"verdict: avoided = damage <= 25% of the control's, reduced = <= 75%, else not avoided.",
              f"{'arm':24s} {'max loss':>8s} {'skipped':>7s} {'rollbacks':>9s} {'after':>7s} {'vs ctrl':>7s} "
              f"{'damage':>7s} {'later':>7s} {'vs clean':>8s}  verdict"]
    for name, run in runs.items():
        in_window = [run.loss[s] for s in range(first, end) if s in run.loss]
        skipped = sum(run.skipped.get(s, 0) for s in range(first, total))
        a = run.mean_loss(*after)
        damage = a - clean.mean_loss(*after) if clean else math.nan
        later_vs_clean = run.mean_loss(*late) - clean.mean_loss(*late) if clean else math.nan
        if name == "clean":
            verdict = "reference (no bad chunk)"
        elif name == "control":
            verdict = "spiked (no plugin)"
        elif not (math.isfinite(damage) and math.isfinite(damage_control) and damage_control > 0):
            verdict = "n/a (no clean arm or no control damage)"
        elif damage <= 0.25 * damage_control:
            verdict = "avoided"
        elif damage <= 0.75 * damage_control:
            verdict = "reduced"
        else:
            verdict = "not avoided"
        lines.append(f"{name:24s} {max(in_window) if in_window else math.nan:8.3f} {skipped:7d} "
                     f"{run.count('rollback'):9d} {fmt(a):>7s} {fmt(a - control.mean_loss(*after), True):>7s} "
                     f"{fmt(damage, True):>7s} {fmt(run.mean_loss(*late)):>7s} {fmt(later_vs_clean, True):>8s}  {verdict}")
    resume_step = min(min(run.loss) for name, run in runs.items() if name != "control")
    extras = [(name, metric, values) for name, run in runs.items() for metric, values in sorted(run.extra.items())]
    if extras:
        lines += ["", f"plugin metrics (mean per step): before the chunk = steps {resume_step}-{first - 1}, "
                      f"during = {first}-{end - 1}, after = {end}-{total - 1}"]
        for name, metric, values in extras:
            parts = []
            for label, (a, b) in (("before", (resume_step, first)), ("during", (first, end)), ("after", (end, total))):
                v = [values[s] for s in range(a, b) if s in values]
                parts.append(f"{label} {statistics.fmean(v):.2f}" if v else f"{label} n/a")
            lines.append(f"  {name:22s} {metric:30s} " + ", ".join(parts))
    evals = {name: run.eval_nll() for name, run in runs.items()}
    steps = sorted(set().union(*[set(e) for e in evals.values()]))
    if steps:
        lines += ["", "validation loss (keel eval, mean token NLL per source; in brackets: minus the control's)"]
        for step in steps:
            sources = sorted(set().union(*[set(e.get(step, {})) for e in evals.values()]))
            lines.append(f"step {step}: " + "  ".join(f"{s:>16s}" for s in sources))
            for name in runs:
                row = evals[name].get(step)
                if not row:
                    continue
                ref = evals["control"].get(step, {})
                cells = [f"{row[s]:.3f} ({row[s] - ref[s]:+.3f})" if s in ref else f"{row[s]:.3f}" for s in sources]
                lines.append(f"  {name:22s} " + "  ".join(f"{c:>16s}" for c in cells))
    print("\n".join(lines))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "resume-point":
        resume_point(sys.argv[2])
    elif len(sys.argv) >= 4 and sys.argv[1] == "summary":
        summary(sys.argv[2], sys.argv[3:])
    else:
        sys.exit("usage: analyze.py resume-point CONTROL_RUN_DIR | analyze.py summary OUT_DIR ARM...")


if __name__ == "__main__":
    main()
