"""Text-to-image throughput: ``generate_from_captions`` vs. the plain diffusers pipeline call.

Both generate the same prompts with the same pipeline object, batch size,
steps and size; fairbalance adds file writing, per-image seeds and the
FiftyOne samples with provenance. Prints images/s (median of repeats) and
the ratio (target >= 1.0x, i.e. no overhead that matters).

The pipeline is a small Stable Diffusion with random weights built like the
test fixtures (no weights can be downloaded here); ``--model`` takes a real
hub id or folder where one is available.
Usage: python benchmarks/bench_t2i.py [--prompts 16] [--steps 10] [--size 64] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import fiftyone as fo
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from fairbalance.core import models
    from fairbalance.generate.text_to_image import generate_from_captions

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import tiny_models

            model = tiny_models.build_stable_diffusion(os.path.join(tmp, "sd"))
        pipe = models.load_diffusion_pipeline(model, safety_checker=None, requires_safety_checker=False)
        prompts = [f"a photo of a {c} handwritten digit {i}" for i, c in
                   zip(range(args.prompts), ["red", "green", "blue", "yellow"] * args.prompts)]
        ds = fo.Dataset()
        ds.add_samples([fo.Sample(filepath=f"/src/{i}.png", caps=[p]) for i, p in enumerate(prompts)])

        def plain():
            for b in range(0, len(prompts), args.batch_size):
                batch = prompts[b:b + args.batch_size]
                gens = [torch.Generator().manual_seed(i) for i in range(len(batch))]
                pipe(batch, num_inference_steps=args.steps, height=args.size, width=args.size, generator=gens)

        def ours(r):
            generate_from_captions(ds, "caps", model=model, output_dir=os.path.join(tmp, f"out{r}"),
                                   target_dataset=f"fb-bench-t2i-{r}-{os.getpid()}", label_field=None,
                                   num_inference_steps=args.steps, height=args.size, width=args.size,
                                   batch_size=args.batch_size, safety_checker=False, progress=False)

        t_plain, t_ours = [], []
        for r in range(args.repeats):
            t = time.perf_counter()
            plain()
            t_plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            ours(r)
            t_ours.append(time.perf_counter() - t)
            fo.load_dataset(f"fb-bench-t2i-{r}-{os.getpid()}").delete()
        ds.delete()
    n = len(prompts)
    a, b = statistics.median(t_plain), statistics.median(t_ours)
    print(f"text-to-image, {n} prompts, {args.size}x{args.size}, {args.steps} steps, batch {args.batch_size}, "
          f"{pipe.device}/{pipe.dtype}, median of {args.repeats}")
    print(f"  plain diffusers pipeline call : {n / a:7.2f} img/s")
    print(f"  fairbalance generate_from_captions (+files, samples): {n / b:7.2f} img/s")
    print(f"  ratio: {a / b:.2f}x")


if __name__ == "__main__":
    main()
