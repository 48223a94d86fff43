"""Captioning throughput: per-caption random streams in one batched ``generate`` vs the plain batched call.

``compute_captions`` samples each caption from its own random stream (seeded
from the run's seed, the image's file path and the caption's index) so that
captions do not depend on batch or shard: :class:`RowSeededSampler` draws each
row's Gumbel noise inside one batched ``generate`` call. Baseline: the plain
batched ``generate(do_sample=True)`` it replaced (one stream for the whole
batch). Also timed: one ``generate`` call per image seeded with
``torch.manual_seed`` (the other way to make captions batch-independent).
All caption the same in-memory images with the same model, batch size,
captions per image and tokens; no database. Prints images/s (median of
repeats) and ratios against the baseline.

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
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--vocab", type=int, default=30524, help="vocabulary of the sampling-step timing (BLIP's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from fairbalance.core import models
    from fairbalance.generate.captions import _caption_batch, _to_device, caption_seed

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import tiny_models

            model = tiny_models.build_blip(os.path.join(tmp, "blip"))
        cap = models.load_captioner(model, device=args.device)
        rng = np.random.default_rng(0)
        pil = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
        seeds = [[caption_seed(0, f"/img/{i}.png", k) for k in range(args.captions)] for i in range(len(pil))]
        kw = dict(do_sample=True, top_p=0.9, num_return_sequences=args.captions, max_new_tokens=args.tokens)
        steps = {"n": 0}  # decoder forward calls = decoding steps (the paths' random draws differ, so may their lengths)
        decoder = getattr(cap.model, "text_decoder", cap.model)
        decoder.register_forward_hook(lambda *_: steps.__setitem__("n", steps["n"] + 1))

        @torch.inference_mode()
        def generate(images, seed):
            inputs = _to_device(cap, cap.processor(images=images, return_tensors="pt"))
            torch.manual_seed(seed)
            out = cap.model.generate(**inputs, **kw)
            return cap.processor.batch_decode(out, skip_special_tokens=True)

        def plain():  # the replaced path: one generate per batch, one random stream per batch
            for b in range(0, len(pil), args.batch_size):
                generate(pil[b:b + args.batch_size], b)

        def ours():
            for b in range(0, len(pil), args.batch_size):
                _caption_batch(cap, pil[b:b + args.batch_size], seeds[b:b + args.batch_size], args.tokens)

        def per_image():
            for i, im in enumerate(pil):
                generate([im], seeds[i][0])

        ways = {"plain batched generate (baseline)": plain, "per-caption streams, batched (ours)": ours,
                "one generate per image": per_image}
        times = {name: [] for name in ways}
        num_steps = {}
        for name, fn in ways.items():
            steps["n"] = 0
            fn()  # warm-up
            num_steps[name] = steps["n"]
        for _ in range(args.repeats):
            for name, fn in ways.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    n = len(pil)
    base = statistics.median(times["plain batched generate (baseline)"])
    print(f"captioning, {n} images x {args.captions} captions, up to {args.tokens} new tokens, batch "
          f"{args.batch_size}, {cap.device}/{cap.dtype}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:38s}: {n / t:8.2f} img/s  ({base / t:.2f}x the baseline's speed; "
              f"{num_steps[name]} decoding steps)")
    sampling_step(args, cap.device)


def sampling_step(args, device):
    """One sampling step at a real vocabulary size (the tiny model's is 36): generate's warpers + one
    multinomial draw for the batch vs :class:`RowSeededSampler`'s per-row streams."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from fairbalance.generate.captions import TOP_P, RowSeededSampler

    rows = args.batch_size * args.captions
    scores = torch.randn(rows, args.vocab, device=device) * 3
    ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
    warpers = [TopKLogitsWarper(50), TopPLogitsWarper(TOP_P)]
    sampler = RowSeededSampler(list(range(rows)), device, 50, TOP_P, None)

    def plain():
        s = scores
        for w in warpers:
            s = w(ids, s)
        return torch.multinomial(torch.softmax(s, -1), 1)

    def ours():
        return torch.multinomial(torch.softmax(sampler(ids, scores), -1), 1)

    t_plain, t_ours = [], []
    for _ in range(max(args.repeats, 5)):
        for fn, ts in ((plain, t_plain), (ours, t_ours)):
            t = time.perf_counter()
            for _ in range(20):
                fn()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            ts.append((time.perf_counter() - t) / 20)
    a, b = statistics.median(t_plain), statistics.median(t_ours)
    print(f"one sampling step, {rows} rows x vocabulary {args.vocab}, {device}:")
    print(f"  generate's top-k/top-p + multinomial : {a * 1e3:7.2f} ms")
    print(f"  RowSeededSampler (+ its multinomial) : {b * 1e3:7.2f} ms  ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
