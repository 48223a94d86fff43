"""Does conditional-diffusion oversampling on pseudo-labels balance a hidden attribute?

Colored Digits with an implicit colour imbalance (the attribute; colour is
independent of the digit): cluster -> train the class-conditional diffusion
model on the clusters -> generate the same number per cluster -> estimate
the colour of every generated image with an independent colour classifier
trained on the real images (as the paper does with its age classifier) ->
entropy of the colour for the original set, the generated set, and both.

Features: with ``--clip-model`` weights on disk, the SA features of
``compute_sa_features``; otherwise (no CLIP weights offline) each image's
mean stroke colour, clustered by the same X-means. Usage:
    python benchmarks/bench_balance.py [--epochs 40] [--image-size 32] [--total 2000]
                                       [--clip-model ViT-B-32 --clip-pretrained openai]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np

from fairbalance.core import images, writeback
from fairbalance.datasets import colored_digits as datasets
from fairbalance.find import balance
from fairbalance.train.classifier import apply_classifier, evaluate_classifier, train_classifier
from fairbalance.generate.diffusion import train_conditional_diffusion
from fairbalance.generate.generation import generate_balanced
from fairbalance.find.pseudo_labels import compute_pseudo_labels


def colour_features(view) -> dict:
    """Mean RGB of the bright (stroke) pixels of each image, in [0, 1]."""
    out = {}
    for i, p in zip(*view.values(["id", "filepath"])):
        a = np.asarray(images.load_rgb(p), dtype=np.float32) / 255.0
        strokes = a[a.max(-1) > 0.3]
        out[i] = (strokes.mean(0) if len(strokes) else a.reshape(-1, 3).mean(0)).astype(np.float32)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--colors", type=float, nargs="+", default=[0.55, 0.2, 0.12, 0.08, 0.05])
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--total", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--classifier-epochs", type=int, default=10)
    ap.add_argument("--clip-model", default=None)
    ap.add_argument("--clip-pretrained", default="openai")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    k = len(args.colors)
    with tempfile.TemporaryDirectory() as tmp:
        ds = datasets.colored_digits("fb-bench-balance", num_classes=k, train_per_class=args.train_per_class,
                                     test_per_class=60, color_distribution=args.colors, seed=args.seed,
                                     output_dir=f"{tmp}/data", persistent=False, overwrite=True)
        train, test = ds.match_tags("train"), ds.match_tags("test")
        if args.clip_model:
            from fairbalance.find.sa_features import compute_sa_features

            compute_sa_features(train, "colors", model=args.clip_model, pretrained=args.clip_pretrained or None)
            features = "CLIP SA features"
        else:
            writeback.set_values_by_id(train, {"sa_features": colour_features(train)})
            features = "mean stroke colour (no CLIP weights offline)"
        pl = compute_pseudo_labels(train, kmax=20, seed=args.seed)
        table = balance.balance_report(train, "sa_cluster", attribute_field="color")
        print(f"features: {features}; X-means found {pl.num_clusters} clusters ({pl.criterion})")
        print(table.format())

        model = train_conditional_diffusion(train, "sa_cluster", output_dir=f"{tmp}/model", epochs=args.epochs,
                                            image_size=args.image_size, lr=args.lr, seed=args.seed, progress=False)
        print(f"diffusion trained ({time.time() - t0:.0f} s)")
        res = generate_balanced(train, "sa_cluster", model=model, total=args.total, guidance_scale=args.guidance,
                                num_inference_steps=args.steps, output_dir=f"{tmp}/gen", seed=args.seed)
        print(f"generated {res.num_added} images: {res.added} ({time.time() - t0:.0f} s)")

        # independent colour classifier, trained on real images only
        # (class-weighted, so the rare colours are not under-predicted)
        real_train = ds.match_tags("train").match({"generated": {"$ne": True}})
        freq = real_train.count_values("color.label")
        ids, colours = real_train.values(["id", "color.label"])
        writeback.set_values_by_id(real_train, {"color_weight": {
            i: len(ids) / (len(freq) * freq[c]) for i, c in zip(ids, colours)}})
        clf = train_classifier(real_train, "color", run_key=None, backbone="cnn", pretrained=False,
                               image_size=args.image_size, epochs=args.classifier_epochs, seed=args.seed,
                               weight_field="color_weight")
        apply_classifier(test, clf, "color_estimate")
        acc = evaluate_classifier(test, "color_estimate", "color").accuracy
        gen = ds.match_tags("generated")
        apply_classifier(gen, clf, "color_estimate")

        names = [n for n, _ in datasets.CLASS_COLORS[:k]]
        orig = real_train.count_values("color.label")
        est = gen.count_values("color_estimate.label")
        both = {c: orig.get(c, 0) + est.get(c, 0) for c in names}
        print(f"\ncolour classifier accuracy on the real test split: {100 * acc:.1f}%")
        print(f"{'dataset':<24}" + "".join(f"{n:>9}" for n in names)
              + f"{'entropy':>9}  (max ln {k} = {math.log(k):.3f})")
        for label, counts in (("(A) original", orig), ("(B) generated", est), ("(C) original+generated", both)):
            total = sum(counts.values())
            print(f"{label:<24}" + "".join(f"{100 * counts.get(n, 0) / total:8.1f}%" for n in names)
                  + f"{abs(balance.entropy([counts.get(n, 0) for n in names])):9.3f}")
        # conditioning fidelity: does each cluster generate its own (majority) colour?
        print("\nper cluster: majority colour of its real images -> estimated colours of its generated images")
        real_lab, real_col = real_train.values(["sa_cluster.label", "color.label"])
        gen_lab, gen_col = gen.values(["sa_cluster.label", "color_estimate.label"])
        hits = 0
        for c in sorted(set(real_lab), key=int):
            maj = max(names, key=lambda n: sum(1 for cl, v in zip(real_lab, real_col) if cl == c and v == n))
            got = [v for cl, v in zip(gen_lab, gen_col) if cl == c]
            hits += sum(v == maj for v in got)
            shares = ", ".join(f"{n} {100 * got.count(n) / len(got):.0f}%" for n in names if got.count(n))
            print(f"  cluster {c:>2} ({maj:<6}) -> {shares}")
        print(f"generated images with their cluster's colour: {100 * hits / max(1, len(gen_lab)):.1f}%")
        print(f"total time {time.time() - t0:.0f} s")
        ds.delete()


if __name__ == "__main__":
    main()
