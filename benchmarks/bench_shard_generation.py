"""Sharded generation in one process: the cost of splitting a generate_balanced run into shards.

Trains a tiny conditional diffusion model (random-ish, speed only) on a small
Colored Digits set, then times (a) one ``generate_balanced`` run (the
baseline) and (b) the same plan as ``--shards`` shards run one after another
in this process (each shard loads the model, plans, claims, keeps its job
state; the last merges), on fresh clones, ``--repeats`` times each. Prints
the medians, their ratio and the overhead per shard. Workers on separate
GPUs/machines divide (b) by the number of workers; this measures only what
sharding adds.

Runs on a private mongod started as the tests start theirs.

Usage: python benchmarks/bench_shard_generation.py [--per-class 16] [--shards 4] [--steps 10] [--repeats 3]
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
import conftest  # noqa: E402  (a private mongod and data folder, as the tests have)
conftest.private_database()

sys.path.insert(0, os.path.join(ROOT, "python_lib"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=16)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from fairbalance.datasets import colored_digits as datasets
    from fairbalance.generate.diffusion import train_conditional_diffusion
    from fairbalance.generate.generation import generate_balanced

    torch.set_num_threads(args.threads)
    ds = datasets.colored_digits("bench-shard-gen", num_classes=3, train_per_class=10, test_per_class=2,
                                 image_size=16, persistent=False, overwrite=True)
    tmp = tempfile.mkdtemp()
    model = train_conditional_diffusion(ds, "ground_truth", output_dir=os.path.join(tmp, "model"), epochs=1,
                                        image_size=16, block_out_channels=(16, 32), batch_size=32)
    kw = dict(label_field="ground_truth", model=model.model_dir, per_class=args.per_class,
              num_inference_steps=args.steps, batch_size=16)
    one, sharded = [], []
    for rep in range(args.repeats):
        a = ds.clone()
        t = time.perf_counter()
        generate_balanced(a, output_dir=os.path.join(tmp, f"one{rep}"), **kw)
        one.append(time.perf_counter() - t)
        a.delete()
        b = ds.clone()
        t = time.perf_counter()
        for s in range(args.shards):
            generate_balanced(b, output_dir=os.path.join(tmp, f"sharded{rep}"), shard=s, num_shards=args.shards,
                              chunk_size=8, **kw)
        sharded.append(time.perf_counter() - t)
        assert len(b.match_tags("generated")) == 3 * args.per_class
        b.delete()
    m1, ms = statistics.median(one), statistics.median(sharded)
    print(f"{3 * args.per_class} images, {args.steps} steps, {args.threads} thread(s)")
    print(f"one run: median {m1:.2f} s {[round(x, 2) for x in one]}")
    print(f"{args.shards} shards in turn: median {ms:.2f} s {[round(x, 2) for x in sharded]}")
    print(f"ratio {ms / m1:.2f}x; overhead per shard {(ms - m1) / args.shards:.2f} s")


if __name__ == "__main__":
    main()
