"""Sharded slice discovery in one process: the cost of sharding against one call with the same classifier.

On Colored Digits (train split), with one biased classifier trained once
(GCE, ``--backbone``, random start, 2 epochs: speed only), times (a) one
``discover_slices(view, classifier=...)`` call (the baseline: the model's
outputs, clustering, names, writes) and (b) the same run as ``--shards``
shards called one after the other in this process (chunks of
``--chunk-size``; each shard stores its samples' outputs, the last one
merges: reads them back, clusters, names, writes the slices and the run
record). Prints median wall times over ``--repeats``, the ratio to the
baseline, the overhead per shard ((b) - (a)) / shards and the merge's own
time. Checks that both runs give the same slices. Workers and queuing are
bench_shards.py's part.

Runs on a private mongod started as the tests start theirs.

Usage: python benchmarks/bench_shards_discovery.py [--per-class 200] [--shards 4] [--chunk-size 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import conftest  # noqa: E402  (private mongod and data folder, as the tests have)
conftest.private_database()

sys.path.insert(0, os.path.join(ROOT, "python_lib"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="cnn")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import fairbalance as fb
    from fairbalance.core import sharding
    from fairbalance.datasets import colored_digits as datasets
    from fairbalance.train import training

    ds = datasets.colored_digits(name="bench-shards-discovery", train_per_class=args.per_class, test_per_class=1,
                                 conflict_ratio=0.05, persistent=False, overwrite=True)
    view = ds.match_tags("train")
    config = training.TrainConfig(method="biased", backbone=args.backbone, epochs=2, batch_size=256)
    folder = training.train_classifier(view, config).save(tempfile.mkdtemp(prefix="bench-discovery-"))
    truth = ["bias_aligned", "color", "source_index"]
    single, sharded, merges = [], [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        fb.discover_slices(view, classifier=folder, slice_field=f"a{r}", run_key=f"a{r}", exclude_name_fields=truth)
        single.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in range(args.shards):
            t1 = time.perf_counter()
            res = fb.discover_slices(view, classifier=folder, slice_field=f"b{r}", run_key=f"b{r}", shard=s,
                                     num_shards=args.shards, chunk_size=args.chunk_size, exclude_name_fields=truth)
        sharded.append(time.perf_counter() - t0)
        # the last shard's time less its own model pass (its share of the others' mean): about the merge
        last = time.perf_counter() - t1
        merges.append(last - (sharded[-1] - last) / max(1, args.shards - 1))
        assert res.merged and sharding.get_job(view, f"b{r}")["merged"]
        same = view.values(f"a{r}") == view.values(f"b{r}")
        assert same, "the sharded run's slices differ from the one call's"
    a, b, m = statistics.median(single), statistics.median(sharded), statistics.median(merges)
    print(f"{len(view)} images, backbone {args.backbone}, {args.shards} shards of chunks of {args.chunk_size}, "
          f"median of {args.repeats}, {args.threads} torch thread(s); same slices in every repeat")
    print(f"one call:        {a:7.2f} s")
    print(f"shards + merge:  {b:7.2f} s  ({b / a:.2f}x the one call; {(b - a) / args.shards:.2f} s per shard)")
    print(f"merge (approx.): {m:7.2f} s")
    ds.delete()


if __name__ == "__main__":
    main()
