"""fairbalance LfF against the plain PyTorch LfF loop of ``bench_repair.py``: which difference matters (issue #28).

The two train the same 3x100 MLPs with the same losses (CE x relative difficulty for the debiased model,
GCE q=0.7 for the biased one, per-class max normalisation of the EMAs), optimiser (one Adam 1e-3 over both
models), batch size 256, data (bit for bit) and model selection (best val epoch); they differ in three places,
each a switch of ``bench_repair.plain_train``:

- ``ema_start``: the plain loop starts each sample's loss EMA at 0 (its first value 0.3 x the loss);
  fairbalance and the official LfF code (``util.EMA.update``: ``(1 - alpha * updated) * loss``) at the
  first loss;
- ``order``: the plain loop draws each epoch's batch order from the global torch RNG (after the two
  models' init); fairbalance from its own ``torch.Generator`` seeded with the seed;
- ``init_draws``: fairbalance's initial weights come two int64 draws later in the global RNG (the base seeds
  of the two DataLoaders that load the val and train images after the seed is set).

Variants: ``plain`` (the baseline as in every README table), ``first`` (EMA from the first loss), ``rng``
(fairbalance's random draws: batch order and init), ``first_rng`` (all three: fairbalance's loop in plain
PyTorch) and ``library`` (``train_classifier(method="lff")``, on ``--library-seeds``). The run prints each
seed's unbiased test accuracy, whether ``first_rng`` and ``library`` give the same test predictions (the list
of differences is complete when they do), and per variant mean ± std and the paired differences to ``plain``.

Usage: cd benchmarks && python bench_lff_parity.py [--dataset colored|corrupted] [--build a|b] [--ratio 0.02]
           [--seeds 0 1 2 3 4 5] [--epochs 100] [--variants plain first rng first_rng library]
           [--library-seeds 0] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")

import fairbalance as fb  # noqa: E402
from bench_repair import BUILDS, arrays, evaluate, plain_train  # noqa: E402
from fairbalance.train.classifier import train_classifier  # noqa: E402

RNG = dict(order="generator", init_draws=2)  # fairbalance's random draws: batch order and initial weights
VARIANTS = {"plain": dict(ema_start="zero"), "first": dict(ema_start="first"), "rng": dict(ema_start="zero", **RNG),
            "first_rng": dict(ema_start="first", **RNG), "library": None}


def build(args, work):
    name = f"fb-lff-parity-{args.dataset}-{args.build}-{args.ratio}-{os.getpid()}"
    if args.dataset == "corrupted":
        from fairbalance.datasets.corrupted_mnist import corrupted_mnist

        return corrupted_mnist(name, conflict_ratio=args.ratio, output_dir=work, overwrite=True,
                               seed=BUILDS[args.build]["seed"])
    return fb.colored_mnist(name, conflict_ratio=args.ratio, output_dir=work, overwrite=True, **BUILDS[args.build])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=("colored", "corrupted"), default="colored")
    ap.add_argument("--build", choices=tuple(BUILDS), default="a")
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--library-seeds", type=int, nargs="*", default=None,
                    help="the seeds the library variant runs on (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work_dir or tempfile.mkdtemp(prefix="lffpar-")
    t_start = time.time()
    ds = build(args, work)
    train, val, test = ds.match_tags("train"), ds.match_tags("val"), ds.match_tags("test")
    x, y = arrays(train)
    xv, yv = arrays(val)
    xt, yt = arrays(test)
    conflicting = ~np.array(test.values("bias_aligned"))
    rows, preds = {v: {} for v in args.variants}, {}
    for seed in args.seeds:
        for v in args.variants:
            if v == "library" and args.library_seeds is not None and seed not in args.library_seeds:
                continue
            t0 = time.time()
            if v == "library":
                clf = train_classifier(train, method="lff", seed=seed, val_samples=val, run_key=None,
                                       epochs=args.epochs)
                net, acc = clf.model, evaluate(clf, test, xt, yt, conflicting)
            else:
                net = plain_train(x, y, xv, yv, seed, lff=True, epochs=args.epochs, **VARIANTS[v])
                acc = evaluate(net, test, xt, yt, conflicting)
            with torch.no_grad():
                preds[v, seed] = net.eval()(xt)
            rows[v][seed] = acc
            print(f"row: {v}, seed {seed}: {acc[0]:.1f} / {acc[1]:.1f} (all / conflicting), {time.time() - t0:.0f} s",
                  flush=True)
        if ("first_rng", seed) in preds and ("library", seed) in preds:
            a, b = preds["first_rng", seed], preds["library", seed]
            same = int((a.argmax(1) == b.argmax(1)).sum())
            print(f"seed {seed}: first_rng and library agree on {same} / {len(yt)} test predictions; largest test logit "
                  f"difference {float((a - b).abs().max()):.3g}", flush=True)
    print(f"\n## LfF parity: {args.dataset} build {args.build}, {args.ratio:.1%} conflicting; {len(train)} train, "
          f"{len(val)} val, {len(test)} test; seeds {args.seeds}; {args.epochs} epochs; {time.time() - t_start:.0f} s")
    print("| variant | unbiased test acc. | bias-conflicting | minus plain (paired), mean ± std | per seed |")
    print("|---|---|---|---|---|")
    for v, by_seed in rows.items():
        a = np.array([by_seed[s] for s in args.seeds if s in by_seed])
        if not len(a):
            continue
        diff = ""
        if v != "plain" and "plain" in rows:
            d = np.array([by_seed[s][0] - rows["plain"][s][0] for s in args.seeds if s in by_seed and s in rows["plain"]])
            diff = f"{d.mean():+.1f} ± {d.std():.1f}"
        per = ", ".join(f"{by_seed[s][0]:.1f}" for s in args.seeds if s in by_seed)
        print(f"| {v} | {a[:, 0].mean():.1f} ± {a[:, 0].std():.1f} | {a[:, 1].mean():.1f} ± {a[:, 1].std():.1f} "
              f"| {diff} | {per} |")
    ds.delete()


if __name__ == "__main__":
    main()
