"""Sharded hardness losses in one process: the cost of sharding against one call with the same classifier.

On Colored Digits (train split), with one biased classifier trained once
(GCE, ``--backbone``, random start, 2 epochs: speed only), times (a) one
``compute_hardness_tags(view, classifier=...)`` call (the baseline) and (b)
the same run as ``--shards`` shards called one after the other in this
process (chunks of ``--chunk-size``; the last shard merges: ranks, tags,
run record). Prints median wall times over ``--repeats``, the ratio to the
baseline, the overhead per shard ((b) - (a)) / shards (job document, view
digest, per-chunk queries and writes) and the merge's own time. Checks that
both runs tag the same samples. Workers and queuing are bench_shards.py's part.

Runs on a private mongod started as the tests start theirs.

Usage: python benchmarks/bench_shards_hardness.py [--per-class 200] [--shards 4] [--chunk-size 256] [--repeats 3]
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
    args = parser.parse_args()

    from fairbalance.core import runs, sharding
    from fairbalance.datasets import colored_digits as datasets
    from fairbalance.train import training
    from fairbalance.tag.hardness import compute_hardness

    ds = datasets.colored_digits(name="bench-shards-hardness", train_per_class=args.per_class, test_per_class=1,
                                 conflict_ratio=0.05, persistent=False, overwrite=True)
    view = ds.match_tags("train")
    config = training.TrainConfig(method="biased", backbone=args.backbone, epochs=2, batch_size=256)
    folder = training.train_classifier(view, config).save(tempfile.mkdtemp(prefix="bench-hardness-"))
    single, sharded, merges = [], [], []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        compute_hardness(view, classifier=folder, loss_field=f"a{r}", tag=f"a{r}", run_key=f"a{r}")
        single.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in range(args.shards):
            t1 = time.perf_counter()
            res = compute_hardness(view, classifier=folder, loss_field=f"b{r}", tag=f"b{r}", run_key=f"b{r}",
                                   shard=s, num_shards=args.shards, chunk_size=args.chunk_size)
        sharded.append(time.perf_counter() - t0)
        job = sharding.get_job(view, f"b{r}")
        # the last shard's time less its own predicting (its share of the others' mean): about the merge
        last = time.perf_counter() - t1
        merges.append(last - (sharded[-1] - last) / max(1, args.shards - 1))
        assert res.merged and job["merged"]
        assert set(ds.match_tags(f"a{r}").values("id")) == set(ds.match_tags(f"b{r}").values("id"))
        assert runs.load_run_results(ds, f"a{r}")["tagged_ids"] == runs.load_run_results(ds, f"b{r}")["tagged_ids"]
    a, b, m = statistics.median(single), statistics.median(sharded), statistics.median(merges)
    print(f"{len(view)} images, backbone {args.backbone}, {args.shards} shards of chunks of {args.chunk_size}, "
          f"median of {args.repeats}")
    print(f"one call:        {a:7.2f} s")
    print(f"shards + merge:  {b:7.2f} s  ({b / a:.2f}x the one call; {(b - a) / args.shards:.2f} s per shard)")
    print(f"merge (approx.): {m:7.2f} s")
    ds.delete()


if __name__ == "__main__":
    main()
