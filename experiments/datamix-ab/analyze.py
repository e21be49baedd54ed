#!/usr/bin/env python3
"""Why: the A/B answer of datamix-ab, read straight from the `keel eval` files (docs/eval.md) so that anyone can
check it with h5py. For every eval step and source it prints each arm's validation loss (mean token NLL) as
mean ± sd over seeds, and each arm's paired difference from the baseline arm: per seed, arm minus baseline
(both branched from that seed's base checkpoint, same data order), then mean ± sd of those differences and
a 95% interval (mean ± t * sd / sqrt(n)).

  analyze.py OUT_DIR BASELINE_ARM ARM...     (run dirs are OUT_DIR/<arm>-seed<N>)"""
import glob
import math
import os
import re
import statistics
import sys

import h5py

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t95(df):
    return T95.get(df, 1.96 if df > 30 else 2.1)


def read_evals(run_dir):
    """{step: {source: nll}}"""
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "eval", "step-*.h5"))):
        with h5py.File(path, "r") as f:
            out[int(f.attrs["step"])] = {src: float(f[f"/validation/{src}/nll"][0]) for src in f["/validation"]}
    return out


def mean_sd(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def main():
    if len(sys.argv) < 4:
        sys.exit("usage: analyze.py OUT_DIR BASELINE_ARM ARM...")
    out_dir, baseline, arms = sys.argv[1], sys.argv[2], sys.argv[3:]
    if baseline not in arms:
        sys.exit(f"analyze.py: the baseline arm '{baseline}' is not among the arms {arms}")
    evals = {}  # arm -> seed -> {step: {source: nll}}
    for arm in arms:
        evals[arm] = {}
        for d in sorted(glob.glob(os.path.join(out_dir, f"{arm}-seed*"))):
            m = re.fullmatch(re.escape(arm) + r"-seed(\d+)", os.path.basename(d))
            if m:
                evals[arm][int(m.group(1))] = read_evals(d)
        if not evals[arm]:
            sys.exit(f"analyze.py: no run dirs {out_dir}/{arm}-seed<N>")
    seeds = sorted(set.intersection(*[set(s) for s in evals.values()]))
    lines = [f"datamix-ab: {os.path.abspath(out_dir)}",
             f"SEEDS: {len(seeds)} per arm ({', '.join(map(str, seeds))}); arms: {', '.join(arms)}; baseline: {baseline}",
             "validation loss = mean token NLL per source (keel eval); diff = arm minus baseline, paired by seed;",
             "mean ± sd over seeds; CI95 = mean ± t * sd / sqrt(n). A negative diff means the arm is better."]
    steps = sorted(set.intersection(*[set(evals[a][s]) for a in arms for s in seeds]))
    if not steps:
        sys.exit("analyze.py: no eval step that every arm and seed has")
    for step in steps:
        sources = sorted(evals[baseline][seeds[0]][step])
        lines += ["", f"step {step}"]
        for src in sources:
            lines.append(f"  {src}")
            for arm in arms:
                values = [evals[arm][s][step][src] for s in seeds]
                m, sd = mean_sd(values)
                row = f"    {arm:12s} loss {m:.4f} ± {sd:.4f}"
                if arm != baseline:
                    diffs = [evals[arm][s][step][src] - evals[baseline][s][step][src] for s in seeds]
                    dm, dsd = mean_sd(diffs)
                    half = t95(len(diffs) - 1) * dsd / math.sqrt(len(diffs))
                    sign = "  (interval excludes 0)" if abs(dm) > half else ""
                    row += (f"   diff {dm:+.4f} ± {dsd:.4f}   CI95 [{dm - half:+.4f}, {dm + half:+.4f}]"
                            f"   per seed {' '.join(f'{d:+.4f}' for d in diffs)}{sign}")
                lines.append(row)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
