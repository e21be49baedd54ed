#!/usr/bin/env python3
"""Why: the A/B answer of datamix-ab as text (summary.txt). The statistics are not computed here: they come from
`keel report RUN_DIR... --json` (docs/cli.md), the one implementation of the A/B table (exact Student's t
quantiles for any number of seeds), so summary.txt and report.html always show the same numbers. For every
eval step and source it prints each arm's validation loss (mean token NLL, from the `keel eval` files) as
mean ± sd over seeds, and each arm's paired difference from the baseline arm: per seed, arm minus baseline
(both branched from that seed's base checkpoint, same data order), then mean ± sd of those differences and
the 95% interval (mean ± t * sd / sqrt(n)).

  analyze.py OUT_DIR AB_JSON     (AB_JSON: the output of `keel report OUT_DIR/<arm>-seed<N>... --json`)"""
import json
import os
import sys


def fail(message):
    sys.exit(f"analyze.py: {message}")


def num(x, fmt):
    """x formatted with fmt; NaN (null in the JSON: too few values) as "nan"."""
    return format(float("nan") if x is None else x, fmt)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: analyze.py OUT_DIR AB_JSON")
    out_dir, ab_path = sys.argv[1], sys.argv[2]
    try:
        with open(ab_path) as f:
            ab = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"cannot read the A/B table {ab_path}: {e}")
    baseline, arms = ab["baseline"], ab["arms"]
    seeds_of = {arm: {run["seed"] for run in ab["runs"] if run["arm"] == arm} for arm in arms}
    seeds = sorted(set.intersection(*seeds_of.values())) if arms else []
    if not seeds or min(seeds) < 0:
        fail(f"{ab_path}: the runs are not named <arm>-seed<N> with common seeds")
    # (step, source) -> arm -> row of the table; only the validation loss is summarised here.
    rows = {}
    for row in ab["rows"]:
        metric = row["metric"]
        if metric["kind"] == "eval_loss":
            rows.setdefault((metric["eval_step"], metric["source"]), {})[row["arm"]] = row
    cells = sorted(key for key, by_arm in rows.items() if all(arm in by_arm for arm in arms))
    if not cells:
        fail("no eval step that every arm and seed has")
    lines = [f"datamix-ab: {os.path.abspath(out_dir)}",
             f"SEEDS: {len(seeds)} per arm ({', '.join(map(str, seeds))}); arms: {', '.join(arms)}; baseline: {baseline}",
             "validation loss = mean token NLL per source (keel eval); diff = arm minus baseline, paired by seed;",
             "mean ± sd over seeds; CI95 = mean ± t * sd / sqrt(n). A negative diff means the arm is better."]
    step = None
    for cell_step, source in cells:
        if cell_step != step:
            step = cell_step
            lines += ["", f"step {step}"]
        lines.append(f"  {source}")
        for arm in arms:
            row = rows[(step, source)][arm]
            line = f"    {arm:12s} loss {num(row['mean'], '.4f')} ± {num(row['sd'], '.4f')}"
            d = row["difference"]
            if arm != baseline and d is not None:
                if d["test"] != "paired_t":
                    fail(f"arm {arm}: the difference to {baseline} is not paired by seed ({d['test']})")
                low, high = d["ci_low"], d["ci_high"]
                sign = "  (interval excludes 0)" if low is not None and (low > 0 or high < 0) else ""
                per_seed = " ".join(num(p["value"], "+.4f") for p in d["pairs"])
                line += (f"   diff {num(d['mean'], '+.4f')} ± {num(d['sd'], '.4f')}   "
                         f"CI95 [{num(low, '+.4f')}, {num(high, '+.4f')}]   per seed {per_seed}{sign}")
            lines.append(line)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
