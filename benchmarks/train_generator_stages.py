"""One generator training run, its model kept at several epoch counts (for ``bench_realism.py --base-model``).

The digit x cluster diffusion model of ``bench_repair.py`` / ``bench_realism.py`` (same build, ratio, X-means
cells on the colour stand-in features, learning rate, seed) trained once to the largest of ``--epochs``; after
each listed count the model folder is copied to ``<work>/model_e<N>``. The learning rate is constant and a rerun
with more epochs resumes the same run exactly (``train_conditional_diffusion``), so ``model_e<N>`` is the model a
fresh N-epoch training gives. ``<work>/data`` holds the images, as ``--base-model`` expects.

Usage: nice -n 10 python benchmarks/train_generator_stages.py --build a --ratio 0.01 --epochs 3 8 15
           --work-dir /tmp/gen-a --threads 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from types import SimpleNamespace

import torch

os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")

import fairbalance as fb  # noqa: E402
import bench_repair  # noqa: E402
from bench_repair import BUILDS, cell_attribute  # noqa: E402
from fairbalance.generate.diffusion import train_conditional_diffusion  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="a", choices=list(BUILDS))
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--epochs", type=int, nargs="+", required=True)
    ap.add_argument("--diffusion-lr", type=float, default=1e-3)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    build = BUILDS[args.build]
    bench_repair.PALETTE = build.get("palette", bench_repair.PALETTE)
    bench_repair.NAMES[:] = [n for n, _ in bench_repair.PALETTE]
    ds = fb.colored_mnist(f"fb-gen-stages-{args.build}-{args.ratio}", conflict_ratio=args.ratio,
                          output_dir=os.path.join(args.work_dir, "data"), overwrite=True, **build)
    train = ds.match_tags("train")
    field, num = cell_attribute(train, SimpleNamespace(features="stand-in"), args.work_dir)
    print(f"build {args.build} {args.ratio:.1%}: {num} X-means clusters", flush=True)
    folder, t0 = os.path.join(args.work_dir, "model"), time.time()
    for n in sorted(set(args.epochs)):
        res = train_conditional_diffusion(train, "ground_truth", attribute_field=field, output_dir=folder, epochs=n,
                                          lr=args.diffusion_lr, batch_size=64, seed=0, progress=False,
                                          overwrite=False, resume=True)
        dest = os.path.join(args.work_dir, f"model_e{n}")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("training_state*"))
        print(f"epochs {n}: {res.steps} steps, last-epoch loss {res.final_loss:.4f}, {time.time() - t0:.0f} s "
              f"-> {dest}", flush=True)
    ds.delete()


if __name__ == "__main__":
    main()
