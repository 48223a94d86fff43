"""One generator training run, its model kept at several epoch counts (for ``bench_realism.py --base-model``).

The digit x cluster diffusion model of ``bench_repair.py`` / ``bench_realism.py`` (same build, ratio, X-means
cells on the colour stand-in features, learning rate, seed) trained once to the largest of ``--epochs``; after
each listed count the model folder is copied to ``<work>/model_e<N>``. The learning rate is constant and a rerun
with more epochs resumes the same run exactly (``train_conditional_diffusion``), so ``model_e<N>`` is the model a
fresh N-epoch training gives. ``<work>/data`` holds the images, as ``--base-model`` expects.

A rerun in the same ``--work-dir`` does **not** resume by itself: each run builds its dataset anew and deletes
it at the end, and a model folder whose dataset no longer exists is taken over, its files deleted
(``fairbalance.core.folders.claim_output_folder``). ``--resume-from <an earlier run's work-dir>/model`` (also
a copy made elsewhere) adopts that folder's training state instead: the images of ``<work>/data`` are checked
to be the very images (bytes) and labels the folder was trained on, the folder is copied into ``<work>/model``
(claimed by this run's dataset) and its data fingerprint rewritten for the new paths; training then resumes
from its last checkpoint (the same steps a single longer run takes).

Usage: nice -n 10 python benchmarks/train_generator_stages.py --build a --ratio 0.01 --epochs 3 8 15
           --work-dir /tmp/gen-a --threads 1
       cp -a /tmp/gen-a /tmp/gen-a2 && python benchmarks/train_generator_stages.py --build a --ratio 0.01
           --epochs 30 --work-dir /tmp/gen-a2 --resume-from /tmp/gen-a/model --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from types import SimpleNamespace

import torch

os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")

import fairbalance as fb  # noqa: E402
import bench_repair  # noqa: E402
from bench_repair import BUILDS, _lora_fingerprint, cell_attribute  # noqa: E402
from fairbalance.core.folders import claim_output_folder  # noqa: E402
from fairbalance.generate.diffusion import train_conditional_diffusion  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="a", choices=list(BUILDS))
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--epochs", type=int, nargs="+", required=True)
    ap.add_argument("--diffusion-lr", type=float, default=1e-3)
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume-from", default=None,
                    help="an earlier run's model folder (its images in ../data): resume its training state")
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
    if args.resume_from:
        adopt(train, field, args.resume_from, os.path.join(args.work_dir, "data"), folder)
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


def _file_hash(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def adopt(train, field, source, data_dir, folder):
    """Copy the model folder ``source`` (training state included) to ``folder``, claimed by ``train``'s dataset,
    after checking that ``train`` holds the very images (bytes) and labels it was trained on (``source``'s
    ``../data``); its data fingerprint is rewritten for the images' paths here."""
    source = os.path.abspath(source)
    original = os.path.join(os.path.dirname(source.rstrip("/")), "data")
    labels_file = os.path.join(source, "fairbalance_labels.json")
    with open(labels_file) as f:
        saved = json.load(f)
    if saved["config"]["data_fingerprint"] != _lora_fingerprint(train, data_dir, original, field):
        raise SystemExit(f"{source} was trained on other images or labels than {data_dir}'s: not resumed")
    paths = train.values("filepath")
    changed = [p for p in paths if _file_hash(p) != _file_hash(p.replace(data_dir, original, 1))]
    if changed:
        raise SystemExit(f"{len(changed)} images differ from {original}'s (e.g. {changed[0]}): not resumed")
    with tempfile.TemporaryDirectory() as tmp:  # a copy first: ``source`` may be ``folder`` itself
        copy = os.path.join(tmp, "model")
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".fairbalance_owner.json"))
        shutil.rmtree(folder, ignore_errors=True)
        claim_output_folder(folder, train._root_dataset, "conditional_diffusion")  # this run's dataset owns it
        shutil.copytree(copy, folder, dirs_exist_ok=True)
    saved["config"]["data_fingerprint"] = _lora_fingerprint(train, data_dir, data_dir, field)
    with open(os.path.join(folder, "fairbalance_labels.json"), "w") as f:
        json.dump(saved, f, indent=1)
    print(f"adopted {source} (step {saved.get('step')}, {len(paths)} images checked byte for byte)", flush=True)


if __name__ == "__main__":
    main()
