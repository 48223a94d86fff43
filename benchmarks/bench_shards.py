"""Sharded SA features on FiftyOne's delegated workers: 1 vs 2 workers against one process.

Runs, on the same Colored Digits images and the same CLIP architecture
(random weights: speed only), (a) ``compute_sa_features`` in this process
(the baseline), then (b) ``queue_sharded(..., num_shards)`` executed by 1 and
by 2 real ``fiftyone delegated launch`` workers, started and idle before the
clock starts. Prints wall times (queue -> merged), the ratio to the
baseline, and the overhead per shard: (1-worker time - baseline) / shards
(queuing, worker pick-up, model loading per shard, chunked writes, merge).

Runs on a private mongod started as the tests start theirs (so the workers
pick up no one else's operations); the workers get this checkout's plugin
and library.

Usage: python benchmarks/bench_shards.py [--images 400] [--shards 4] [--model ViT-B-32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a private mongod, data folder and plugin path, as the tests have (tests/conftest.py): the workers started
# here must not pick up anybody else's queued operations
sys.path.insert(0, os.path.join(ROOT, "tests"))
import conftest  # noqa: E402
conftest.private_database()

os.environ["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python_lib")] +
                                           [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
sys.path.insert(0, os.path.join(ROOT, "python_lib"))


def _workers(n, logdir):
    cli = os.path.join(os.path.dirname(sys.executable), "fiftyone")
    procs = []
    for i in range(n):
        log = open(os.path.join(logdir, f"worker{i}.log"), "w")
        procs.append((subprocess.Popen([cli, "delegated", "launch"], stdout=log, stderr=subprocess.STDOUT),
                      log.name))
    for _, path in procs:  # wait until each polls the queue
        while "service running" not in open(path).read():
            time.sleep(0.2)
    return [p for p, _ in procs]


def _stop(procs):
    import signal

    for p in procs:
        p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--model", default="ViT-B-32")
    args = parser.parse_args()

    import fiftyone as fo

    import fairbalance as fb

    ds = fb.colored_digits(name="fb-bench-shards", train_per_class=max(1, args.images // 10), test_per_class=1,
                           persistent=True, overwrite=True)
    kw = dict(related_texts_override=["a red digit", "a green digit", "a blue digit", "a yellow digit"],
              model=args.model, pretrained=None, device="cpu", num_workers=0)
    try:
        t = time.perf_counter()
        fb.compute_sa_features(ds, embeddings_field="emb_base", features_field="sa_base", run_key="base", **kw)
        base = time.perf_counter() - t
        print(f"\nSA features, {len(ds)} Colored Digits images, {args.model} (random weights), CPU "
              f"({os.cpu_count()} cores), {args.shards} shards of chunks of {args.chunk_size}")
        print(f"  one process, compute_sa_features (baseline): {base:7.1f} s")
        rows = {}
        for n in (1, 2):
            with tempfile.TemporaryDirectory() as logdir:
                procs = _workers(n, logdir)
                try:
                    key = f"sharded{n}"
                    t = time.perf_counter()
                    fb.queue_sharded(ds, "compute_sa_features", num_shards=args.shards, run_key=key,
                                     embeddings_field=f"emb_{key}", features_field=f"sa_{key}",
                                     chunk_size=args.chunk_size, **kw)
                    while not fb.sharded_status(ds, key)["merged"]:
                        failed = [s for s in fb.sharded_status(ds, key)["shards"] if s["operation_state"] == "failed"]
                        if failed:
                            raise RuntimeError(f"shard failed: {failed}; see {logdir}")
                        time.sleep(0.1)
                    rows[n] = time.perf_counter() - t
                finally:
                    _stop(procs)
            print(f"  {n} worker{'s' if n > 1 else ' '}, queue_sharded -> merged:          {rows[n]:7.1f} s   "
                  f"ratio to baseline {base / rows[n]:.2f}x")
        print(f"  speed-up of 2 workers over 1: {rows[1] / rows[2]:.2f}x; overhead per shard (1 worker - baseline) / "
              "shards: "
              f"{(rows[1] - base) / args.shards:.1f} s")
    finally:
        if fo.dataset_exists(ds.name):
            fo.delete_dataset(ds.name)


if __name__ == "__main__":
    main()
