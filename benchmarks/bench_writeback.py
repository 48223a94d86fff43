"""Write-back of N labels: fairbalance's bulk ``set_values_by_id`` vs. a per-sample ``sample.save()`` loop.

Prints the median seconds of each over repeats and the speed-up ratio, both
run in this process on the same dataset. Usage:
    python benchmarks/bench_writeback.py [--n 100000] [--loop-n 5000] [--repeats 3]
The per-sample loop is timed on ``--loop-n`` samples and scaled to N (it is
linear), so the benchmark stays short.
"""

import argparse
import statistics
import time

import fiftyone as fo

from fairbalance.core import writeback


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--loop-n", type=int, default=5_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=f"/bench/{i}.png") for i in range(args.n)], progress=False)
    ids = ds.values("id")
    bulk, loop = [], []
    for r in range(args.repeats):
        values = {"label": {i: fo.Classification(label=str((j + r) % 20)) for j, i in enumerate(ids)}}
        t = time.perf_counter()
        writeback.set_values_by_id(ds, values)
        bulk.append(time.perf_counter() - t)

        sub = ds.limit(args.loop_n)
        t = time.perf_counter()
        for j, sample in enumerate(sub.iter_samples(autosave=False)):
            sample["label_loop"] = fo.Classification(label=str((j + r) % 20))
            sample.save()
        loop.append((time.perf_counter() - t) * args.n / args.loop_n)
    assert ds.count_values("label.label")  # the bulk write landed
    b, l = statistics.median(bulk), statistics.median(loop)
    print(f"write-back of {args.n} Classification labels (median of {args.repeats})")
    print(f"  fairbalance set_values_by_id : {b:8.2f} s")
    print(f"  per-sample sample.save() loop: {l:8.2f} s (timed on {args.loop_n}, scaled)")
    print(f"  speed-up: {l / b:.1f}x")
    ds.delete()


if __name__ == "__main__":
    main()
