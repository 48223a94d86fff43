"""Benchmarks for SA features and pseudo-labels; each prints medians and a ratio
against a baseline run in the same process.

(a) ``xmeans``: fairbalance X-means (scikit-learn backend, both criteria) vs.
    pyclustering's C core on n x 20 features (the paper's 22,000 and 1,000,000).
(b) ``embed``: image-embedding throughput of fairbalance's loader + CLIP vs.
    FiftyOne's own ``compute_embeddings`` with the same open_clip
    architecture on the same image files (random weights: speed only).
(c) ``requery``: choosing related texts for a new attribute and recomputing
    features for N stored embeddings, once the WordNet gloss cache exists.

Usage: python benchmarks/bench_sa.py {xmeans,embed,requery} [options]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def _median_time(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def blobs(n):
    """``(x, y)``: n x 20 features in 6 unequal Gaussian clusters (40% ... 4%), the X-means benchmark data."""
    from sklearn.datasets import make_blobs

    sizes = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]) * n
    return make_blobs(n_samples=sizes.astype(int).tolist(), n_features=20, cluster_std=1.5,
                      center_box=(-15, 15), random_state=0)


def bench_xmeans(args):
    from sklearn.metrics import adjusted_rand_score

    from fairbalance.find import clustering

    for n in args.n:
        x, y = blobs(n)
        print(f"\nX-means on {len(x):,} x 20 (6 unequal clusters), kmax=20, median of {args.repeats}")
        rows = []
        ref_t = None
        if clustering.pyclustering_available():
            ref_t, ref = _median_time(lambda: clustering.xmeans(x, criterion="pyclustering", backend="pyclustering"),
                                      args.repeats)
            rows.append(("pyclustering C core (baseline)", ref_t, ref))
        for crit in ("pyclustering", "bic"):
            t, res = _median_time(lambda: clustering.xmeans(x, criterion=crit, backend="sklearn"), args.repeats)
            rows.append((f"fairbalance sklearn, criterion={crit}", t, res))
        for name, t, res in rows:
            ratio = f"{ref_t / t:5.2f}x" if ref_t else "  n/a"
            print(f"  {name:<42} {t:8.2f} s  speed-up {ratio}  K={res.n_clusters}  "
                  f"ARI={adjusted_rand_score(y, res.labels):.3f}")


def _make_images(n, folder):
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits("fb-bench-embed", output_dir=folder, train_per_class=max(1, n // 10),
                                 test_per_class=1, persistent=False, overwrite=True)
    return ds.match_tags("train")


def bench_embed(args):
    import fiftyone.utils.open_clip as fouc
    import torch

    from fairbalance.core import models
    from fairbalance.find import embeddings

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        view = _make_images(args.images, tmp)
        n = len(view)
        clip = models.load_clip(args.model, pretrained=None, device=args.device)
        fo_model = fouc.TorchOpenClipModel(fouc.TorchOpenClipModelConfig(
            {  # as FiftyOne's zoo configures open-clip-torch
                "clip_model": args.model, "pretrained": "", "text_prompt": "A photo of", "classes": ["digit"],
                "entrypoint_fcn": "", "output_processor_cls": "fiftyone.utils.torch.ClassifierOutputProcessor",
                "embeddings_layer": "visual",
            }))
        if args.device:
            fo_model._model.to(args.device)
        fo_model._model.load_state_dict(clip.model.float().state_dict())
        if clip.dtype != torch.float32:
            clip.model.to(clip.dtype)

        def ours():
            emb, _ = embeddings.compute_missing(view, "bench_emb_unused", clip, batch_size=args.batch_size,
                                                num_workers=args.num_workers, progress=False)
            return emb

        def theirs():
            return view.compute_embeddings(fo_model, batch_size=args.batch_size, num_workers=args.num_workers,
                                           progress=False)

        t_fo, fo_emb = _median_time(theirs, args.repeats)
        t_fb, fb_emb = _median_time(ours, args.repeats)
        a = embeddings.normalize(np.stack([fb_emb[i] for i in view.values("id")]))
        b = embeddings.normalize(np.stack([np.asarray(e, dtype=np.float32) for e in fo_emb]))
        agree = float(np.mean(np.sum(a * b, axis=1)))
        print(f"\nImage embeddings, {args.model} ({clip.device}, {clip.dtype}), {n} images, batch {args.batch_size}, "
              f"median of {args.repeats}")
        print(f"  FiftyOne compute_embeddings (baseline): {n / t_fo:8.1f} img/s")
        print(f"  fairbalance embeddings.compute_missing: {n / t_fb:8.1f} img/s")
        print(f"  ratio: {t_fo / t_fb:.2f}x   mean cosine(fairbalance, FiftyOne) = {agree:.4f}")


def bench_requery(args):
    from fairbalance.core import models
    from fairbalance.find import embeddings, related_texts

    clip = models.load_clip(args.model, pretrained=args.pretrained or None, device=args.device)
    t0 = time.perf_counter()
    related_texts.gloss_embeddings(clip, progress=False)
    print(f"\nGloss cache for {args.model}: {time.perf_counter() - t0:.1f} s (first time builds it)")
    rng = np.random.default_rng(0)
    stored = embeddings.normalize(rng.standard_normal((args.n[0], clip.embed_dim)).astype(np.float32))

    def requery(attribute):
        _, chosen = related_texts.select(clip, attribute, k=20)
        text = clip.encode_text([f"a photo of a {r.text}" for r in chosen]).numpy()
        return stored @ text.T

    attrs = ["races", "age groups", "hair colors", "backgrounds", "clothing", "genders", "lighting"]
    times = []
    for a in attrs[: args.repeats]:
        t = time.perf_counter()
        feats = requery(a)
        times.append(time.perf_counter() - t)
    print(f"Re-query a new attribute on {len(stored):,} stored embeddings: median {statistics.median(times):.3f} s "
          f"over {len(times)} attributes (target < 1 s); features {feats.shape}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", choices=["xmeans", "embed", "requery"])
    ap.add_argument("--n", type=int, nargs="+", default=[22_000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--pretrained", default="")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    {"xmeans": bench_xmeans, "embed": bench_embed, "requery": bench_requery}[args.which](args)


if __name__ == "__main__":
    main()
