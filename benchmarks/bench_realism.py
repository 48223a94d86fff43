"""Do content-preserving edits make generated cells pass for real? Small-scale, one build, one generator.

Colored MNIST (5,000 real MNIST digits, LfF protocol, dataset seed 0, one
conflict ratio), colour stand-in features -> X-means -> a digit x cluster
diffusion model trained once (as in ``bench_repair.py``), then the same cells
(every digit x cluster cell filled to ``--per-cell`` by editing real digits of
the class) generated with each edit setting:

- ``edit``: partial noising to ``--edit-strength`` + contrast guidance from the
  source's cell (the README's setting);
- ``+inversion``: the start noise is the DDIM inversion of the source under
  its own cell (``generate_balanced(inversion=True)``);
- ``+keep_background``: the source's background pixels copied back;
- ``+both``.

For each: ``measure_realism`` against the real training images (two-sample
accuracy of a held-out MLP discriminator: 0.5 = indistinguishable; mean
intensity ratio; TSTR on the unbiased test split beside TRTR, the same MLP on
as many real training images) and fidelity (digit by a colour-blind CNN,
colour by the nearest palette colour vs the cluster's majority). Nothing here
chooses settings: it reports them side by side.

Usage: nice -n 10 python benchmarks/bench_realism.py [--ratio 0.01] [--diffusion-epochs 6] [--per-cell 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import torch

os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")

import fairbalance as fb  # noqa: E402
from bench_repair import arrays, digit_judge, fidelity, train_generator  # noqa: E402
from fairbalance.generate.generation import generate_balanced  # noqa: E402

SETTINGS = {"edit": {}, "+inversion": {"inversion": True}, "+keep_background": {"keep_background": True},
            "+both": {"inversion": True, "keep_background": True}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--diffusion-epochs", type=int, default=6)
    ap.add_argument("--diffusion-lr", type=float, default=1e-3)
    ap.add_argument("--per-cell", type=int, default=8)
    ap.add_argument("--edit-strength", type=float, default=0.5)
    ap.add_argument("--attribute-guidance", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--judge-epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        ds = fb.colored_mnist(f"fb-bench-realism-{args.ratio}", conflict_ratio=args.ratio, seed=0,
                              output_dir=os.path.join(work, "data"), overwrite=True)
        train, test = ds.match_tags("train"), ds.match_tags("test")
        judge = digit_judge(*arrays(train), epochs=args.judge_epochs)
        x_test, y_test = arrays(test)
        print(f"colour-blind digit judge: {100 * float((judge(x_test) == y_test).float().mean()):.1f}% on the real "
              "test digits", flush=True)
        gen_args = SimpleNamespace(base_model=None, diffusion_epochs=args.diffusion_epochs,
                                   diffusion_lr=args.diffusion_lr)
        model, num_clusters, t_train = train_generator(train, gen_args, work, args.ratio)
        print(f"\n## Realism of edited cells, Colored MNIST {args.ratio:.1%} conflicting (build: dataset seed 0, "
              f"LfF palette, noise 0.05): {num_clusters} X-means colour clusters (10 true colours); generator "
              f"{args.diffusion_epochs} epochs ({t_train:.0f} s); cells filled to {args.per_cell}; edit strength "
              f"{args.edit_strength}, contrast guidance {args.attribute_guidance}, {args.steps} DDIM steps",
              flush=True)
        print("| setting | images | two-sample acc. | intensity gen/real | background gen / real | TSTR / TRTR "
              "(unbiased test) | right digit | right colour | time |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.settings:
            key = "gen_" + name.strip("+").replace("-", "_")
            t0 = time.time()
            res = generate_balanced(train, "ground_truth", model=model, mode="cells", per_cell=args.per_cell,
                                    source="edit", edit_strength=args.edit_strength, guidance_scale=1.0,
                                    attribute_guidance_scale=args.attribute_guidance,
                                    guidance_reference="source", num_inference_steps=args.steps,
                                    output_dir=os.path.join(work, key), run_key=key, overwrite=True,
                                    realism_sample=0, progress=False, **SETTINGS[name])
            t_gen = time.time() - t0
            from fiftyone import ViewField as Fv

            gen = ds.match(Fv("generation.run_key") == key)
            real = fb.measure_realism(train, gen, "ground_truth", test_samples=test, run_key=f"realism_{key}",
                                      overwrite=True)
            fid = fidelity(ds, train, judge, key)
            print(f"| {name} | {res.num_added} | {real.two_sample_accuracy:.3f} | {real.intensity_ratio:.2f} | "
                  f"{real.generated_statistics['background_intensity']:.3f} / "
                  f"{real.real_statistics['background_intensity']:.3f} | "
                  f"{100 * real.tstr_accuracy:.1f} / {100 * real.trtr_accuracy:.1f} | {fid['digit']:.1f} | "
                  f"{fid['colour']:.1f} | {t_gen:.0f} s |", flush=True)
        ds.delete()
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
