"""Training steps/s with 1 vs N processes under torchrun (gloo on CPUs, NCCL on GPUs).

The same public calls as a user's script (``train_conditional_diffusion``,
``train_classifier``) run under ``torchrun --nproc_per_node N``; the global
batch is the same for every N, so each run takes the same steps. Timed: the
training call on rank 0 (not the launch and imports), median of
``--repeats``. On CPUs each process gets cores / N threads. Usage:
    python benchmarks/bench_multiprocess_training.py [--procs 1 2] [--train-per-class 40] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

DATASET = "bench-multiprocess-training"


def worker(out: str, epochs: int, batch_size: int, image_size: int) -> None:
    import fiftyone as fo

    import fairbalance as fb
    from fairbalance.core import distributed

    view = fo.load_dataset(DATASET).match_tags("train")
    times = {}
    t0 = time.perf_counter()
    r = fb.train_conditional_diffusion(view, "color", output_dir=os.path.join(out, "diffusion"), epochs=epochs,
                                       batch_size=batch_size, image_size=image_size, block_out_channels=(32, 64),
                                       run_key="bench_mp_diffusion", overwrite=True, resume=False)
    times["diffusion"] = (time.perf_counter() - t0, r.steps)
    t0 = time.perf_counter()
    c = fb.train_classifier(view, backbone="cnn", image_size=image_size, epochs=epochs * 4, batch_size=batch_size,
                            run_key="bench_mp_classifier", output_dir=os.path.join(out, "classifier"), overwrite=True)
    steps = c.config.epochs * -(-len(view) // batch_size)  # optimisation steps: epochs x global batches
    times["classifier"] = (time.perf_counter() - t0, steps)
    if distributed.is_main():
        with open(os.path.join(out, "times.json"), "w") as f:
            json.dump({"world_size": distributed.world_size(), **times}, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        out, epochs, batch, size = args.worker
        worker(out, int(epochs), int(batch), int(size))
        return
    import fairbalance as fb

    # persistent: the launched processes open it by name
    ds = fb.colored_digits(DATASET, num_classes=10, train_per_class=args.train_per_class, test_per_class=1,
                           persistent=True, overwrite=True)
    cores = os.cpu_count() or 1
    rows = {}
    try:
        for n in args.procs:
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory() as out:
                    with socket.socket() as s:  # a free port for the rendezvous, released before the launch
                        s.bind(("127.0.0.1", 0))
                        port = s.getsockname()[1]
                    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n)),
                           "FIFTYONE_SHOW_PROGRESS_BARS": "false"}
                    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                                           "--master_port", str(port), os.path.abspath(__file__), "--worker", out,
                                           str(args.epochs), str(args.batch_size), str(args.image_size)],
                                          env=env, capture_output=True, text=True)
                    if proc.returncode:
                        sys.exit(f"{n} process(es) failed:\n{proc.stderr[-5000:]}")
                    with open(os.path.join(out, "times.json")) as f:
                        t = json.load(f)
                for what in ("diffusion", "classifier"):
                    rows.setdefault((what, n), []).append(t[what])
    finally:
        ds.delete()
    print(f"{args.train_per_class * 10} images, global batch "
          f"{args.batch_size}, {args.image_size}px, {cores} cores")
    print(f"{'model':<11} {'procs':>5} {'steps':>6} {'seconds':>8} {'steps/s':>8} {'vs 1 proc':>9}")
    for what in ("diffusion", "classifier"):
        base = None
        for n in args.procs:
            secs = statistics.median(s for s, _ in rows[(what, n)])
            steps = rows[(what, n)][0][1]
            rate = steps / secs
            base = base or rate
            print(f"{what:<11} {n:>5} {steps:>6} {secs:>8.1f} {rate:>8.2f} {rate / base:>8.2f}x")


if __name__ == "__main__":
    main()
