"""What the Balance panel computes on load / view change, on N samples: fairbalance's
``balance_summary`` (database aggregations) vs. pulling the fields into Python and counting.

Both produce the same counts (checked); prints the median seconds of each over
repeats and the ratio, run in this process on the same dataset. Usage:
    python benchmarks/bench_panel.py [--n 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import fiftyone as fo
import numpy as np

from fairbalance.find import balance


def python_counts(view, label_field: str, attribute_field: str) -> tuple[Counter, Counter, dict]:
    """The baseline: every value to Python, then counted (original, all, clusters x attribute)."""
    labels, attrs, generated = view.values([f"{label_field}.label", f"{attribute_field}.label", "generated"])
    before, after, cross = Counter(), Counter(), {}
    for lab, att, gen in zip(labels, attrs, generated):
        if lab is None:
            continue
        after[lab] += 1
        if gen is not True:
            before[lab] += 1
            if att is not None:
                cross.setdefault(lab, Counter())[att] += 1
    for counts in (before, after):
        balance.entropy(counts)
    return before, after, cross


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    clusters = rng.choice(20, size=args.n, p=np.arange(20, 0, -1) / 210)
    colours = rng.choice(5, size=args.n)
    ds = fo.Dataset()
    t = time.perf_counter()
    ds.add_samples([
        fo.Sample(filepath=f"/bench/{i}.png", sa_cluster=fo.Classification(label=str(c)),
                  color=fo.Classification(label=f"colour{a}"), generated=bool(i % 10 == 0))
        for i, (c, a) in enumerate(zip(clusters, colours))
    ], progress=False)
    print(f"{args.n} samples created in {time.perf_counter() - t:.0f} s")
    ours, base = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        summary = balance.balance_summary(ds, "sa_cluster", attribute_field="color")
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        before, after, _ = python_counts(ds, "sa_cluster", "color")
        base.append(time.perf_counter() - t)
    assert summary["before"]["counts"] == dict(before) and summary["after"]["counts"] == dict(after)
    a, b = statistics.median(ours), statistics.median(base)
    print(f"Balance panel summary of {args.n} samples (20 clusters x 5 colours, 10% generated), "
          f"median of {args.repeats}")
    print(f"  fields to Python + Counter : {b:7.3f} s")
    print(f"  fairbalance balance_summary: {a:7.3f} s  ({b / a:.1f}x)")
    ds.delete()


if __name__ == "__main__":
    main()
