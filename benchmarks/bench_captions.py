"""Captioning throughput: one ``generate`` call per image (per-image seeds) vs one call per batch.

``compute_captions`` seeds each image's sampling on its own (so captions do
not depend on batch or shard) and therefore calls ``generate`` once per image;
the baseline is the batched call it replaced (one ``generate`` for
``batch_size`` images, one seed per batch). Both caption the same in-memory
images with the same model, captions per image and tokens; no database.
Prints images/s (median of repeats) and the ratio per-image / batched.

The model is a tiny BLIP with random weights built like the test fixtures (no
weights can be downloaded here); ``--model`` takes a real hub id or folder.
Usage: python benchmarks/bench_captions.py [--images 32] [--batch-size 16] [--captions 3] [--tokens 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--captions", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    from fairbalance import models
    from fairbalance.captions import _caption_image, sample_seed

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import tiny_models

            model = tiny_models.build_blip(os.path.join(tmp, "blip"))
        cap = models.load_captioner(model, device=args.device)
        rng = np.random.default_rng(0)
        pil = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
        kw = dict(do_sample=True, top_p=0.9, num_return_sequences=args.captions, max_new_tokens=args.tokens)

        @torch.inference_mode()
        def batched():  # the replaced path: one generate per batch, seeded per batch
            for b in range(0, len(pil), args.batch_size):
                inputs = cap.processor(images=pil[b:b + args.batch_size], return_tensors="pt")
                inputs = {k: v.to(cap.device, cap.dtype) if v.is_floating_point() else v.to(cap.device)
                          for k, v in inputs.items()}
                torch.manual_seed(b)
                out = cap.model.generate(**inputs, **kw)
                cap.processor.batch_decode(out, skip_special_tokens=True)
            return out.shape[1]

        def per_image():
            for i, im in enumerate(pil):
                _caption_image(cap, im, args.captions, args.tokens, sample_seed(0, f"/img/{i}.png"))

        batched()
        per_image()  # warm-up
        t_batch, t_one = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            length = batched()
            t_batch.append(time.perf_counter() - t)
            t = time.perf_counter()
            per_image()
            t_one.append(time.perf_counter() - t)
    n = len(pil)
    a, b = statistics.median(t_batch), statistics.median(t_one)
    print(f"captioning, {n} images x {args.captions} captions, up to {args.tokens} new tokens (last batch: "
          f"{length} tokens incl. prompt), batch {args.batch_size}, {cap.device}/{cap.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  batched generate (old, seed per batch): {n / a:8.2f} img/s")
    print(f"  generate per image (seed per image)   : {n / b:8.2f} img/s")
    print(f"  ratio per-image / batched             : {a / b:8.2f}x")


if __name__ == "__main__":
    main()
