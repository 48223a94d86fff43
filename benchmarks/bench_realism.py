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
- ``+both``;
- ``+both_s0.3``: both, at edit strength 0.3 (less of the source redrawn);
- ``+both_50steps``: both, 50 DDIM steps;
- ``+both_filter50``: both, then ``filter_generated(method="discriminator",
  action="exclude", bottom_fraction=0.5)``: the realism of the kept half
  (a second, independent discriminator measures it);
- ``+both_weight``: both, density-ratio weights (``action="weight"``) in
  training (the two-sample figure is the unweighted set's);
- ``+both_tone_hist`` / ``+both_tone_src``: both, plus
  ``match_tone="histogram"`` / ``"source"`` (the source's brightness by
  rank / pixel by pixel, hue and saturation from the generator), and the
  last with strength 0.3, the filter, or the weights;
- ``+both_over2``: both, cells filled to twice ``--per-cell``;
  ``+both_over2_filter50`` / ``+both_over2_cell50``: the same images, the
  most separable half excluded overall / within each cell
  (``filter_generated(..., within="generation.cell")``), so training gets
  about as many generated images as ``+both`` at ``--per-cell``.

- ``+both_g1`` / ``+both_g2`` / ``+both_g6`` / ``+both_g8``: both, contrast guidance 1 / 2 / 6 / 8 instead
  of ``--attribute-guidance``; ``+both_s0.7``: both at edit strength 0.7; ``+both_g2_s0.7``,
  ``+both_g2_50steps``, ``+both_g6_50steps``: the combinations (issue #28's sweep of sampling settings).

``--reference val test``: the cell-matched unbiased split(s) the two-sample test also compares with (the
first: the one settings are chosen on; ``val`` is measured without TSTR, median over ``--seeds``).
``--diagnose``: what the discriminator uses (``realism_diagnosis.py``: two-sample tests on value-only and
chroma-only images, hand features' AUCs) against the first reference; ``--grid-dir``: sources and edits
as a PNG per setting. Generators of several epoch counts from one training: ``train_generator_stages.py``.

``--downstream-epochs N`` (> 0) adds the unbiased test accuracy of
``train_classifier(method="synthetic")`` (and ``two_stage``) on real +
that setting's images, one training seed, beside vanilla on real alone.

``--build b`` is ``bench_repair.py``'s second build (another palette, noise
0.03, another split); ``--base-model`` reuses a generator that
``bench_repair.py`` trained on the same build and ratio (checked by its data
fingerprint, else trained anew). ``--seeds``: discriminator seeds of the
two-sample test (the median is reported).

For each: ``measure_realism`` against the real training images (two-sample
accuracy of a held-out MLP discriminator: 0.5 = indistinguishable; beside it
the same test against the unbiased test split weighted to the generated set's
digit x cluster cell mix, ``bench_repair.cell_reference``, measurement only; mean
intensity ratio; TSTR on the unbiased test split beside TRTR, the same MLP on
as many real training images) and fidelity (digit by a colour-blind CNN,
colour by the nearest palette colour vs the cluster's majority). Nothing here
chooses settings: it reports them side by side.

Usage: nice -n 10 python benchmarks/bench_realism.py [--build a|b] [--ratio 0.01] [--diffusion-epochs 6]
           [--per-cell 8] [--base-model DIR] [--settings edit +both ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")

import fairbalance as fb  # noqa: E402
import bench_repair  # noqa: E402
from bench_repair import BUILDS, arrays, digit_judge, fidelity, train_generator  # noqa: E402
from realism_diagnosis import diagnose, report, save_edit_grid  # noqa: E402
from fairbalance.generate.generation import generate_balanced  # noqa: E402

SETTINGS = {"edit": {}, "+inversion": {"inversion": True}, "+keep_background": {"keep_background": True},
            "+both": {"inversion": True, "keep_background": True},
            "+both_s0.3": {"inversion": True, "keep_background": True, "edit_strength": 0.3},
            "+both_50steps": {"inversion": True, "keep_background": True, "num_inference_steps": 50},
            # contrast guidance scale / edit strength / DDIM steps swept against realism and fidelity (issue #28)
            "+both_g2": {"inversion": True, "keep_background": True, "attribute_guidance_scale": 2.0},
            "+both_g1": {"inversion": True, "keep_background": True, "attribute_guidance_scale": 1.0},
            "+both_g6": {"inversion": True, "keep_background": True, "attribute_guidance_scale": 6.0},
            "+both_g8": {"inversion": True, "keep_background": True, "attribute_guidance_scale": 8.0},
            "+both_g6_50steps": {"inversion": True, "keep_background": True, "attribute_guidance_scale": 6.0,
                                 "num_inference_steps": 50},
            "+both_g2_s0.7": {"inversion": True, "keep_background": True, "attribute_guidance_scale": 2.0,
                              "edit_strength": 0.7},
            "+both_s0.7": {"inversion": True, "keep_background": True, "edit_strength": 0.7},
            "+both_g2_50steps": {"inversion": True, "keep_background": True, "attribute_guidance_scale": 2.0,
                                 "num_inference_steps": 50},
            "+both_filter50": {"inversion": True, "keep_background": True},
            "+both_weight": {"inversion": True, "keep_background": True},
            "+both_tone_hist": {"inversion": True, "keep_background": True, "match_tone": "histogram"},
            "+both_tone_src": {"inversion": True, "keep_background": True, "match_tone": "source"},
            "+both_tone_src_s0.3": {"inversion": True, "keep_background": True, "match_tone": "source",
                                    "edit_strength": 0.3},
            "+both_tone_src_filter50": {"inversion": True, "keep_background": True, "match_tone": "source"},
            "+both_tone_src_weight": {"inversion": True, "keep_background": True, "match_tone": "source"},
            # oversampled: cells filled to 2 x --per-cell, then (filter rows) the most separable half left out
            "+both_over2": {"inversion": True, "keep_background": True, "oversample": 2},
            "+both_over2_filter50": {"inversion": True, "keep_background": True, "oversample": 2},
            "+both_over2_cell50": {"inversion": True, "keep_background": True, "oversample": 2}}
FILTERED = {"+both_filter50": 0.5, "+both_tone_src_filter50": 0.5,  # setting -> most separable fraction excluded
            "+both_over2_filter50": 0.5, "+both_over2_cell50": 0.5}
WITHIN = {"+both_over2_cell50": "generation.cell"}  # the fraction excluded within each cell, not overall
WEIGHTED = ("+both_weight", "+both_tone_src_weight")  # density-ratio weights p(real|x)/p(gen|x) in training


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
    ap.add_argument("--build", default="a", choices=list(BUILDS))
    ap.add_argument("--base-model", default=None, help="a generator folder bench_repair.py trained on this build")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="two-sample test seeds (median reported)")
    ap.add_argument("--downstream-epochs", type=int, default=0,
                    help="> 0: train synthetic / two-stage classifiers on real + each setting's images")
    ap.add_argument("--filter-seed", type=int, default=0)
    ap.add_argument("--reference", nargs="+", default=["test"], choices=["val", "test"],
                    help="cell-matched unbiased split(s) the two-sample test also compares with (val: the one "
                         "settings are chosen on; test: reported only)")
    ap.add_argument("--diagnose", action="store_true",
                    help="what the discriminator uses: reduced-image two-sample tests and hand features "
                         "(realism_diagnosis.py) against the first --reference")
    ap.add_argument("--grid-dir", default=None, help="a PNG per setting: sources (top) and edits (bottom)")
    ap.add_argument("--ideal", action="store_true",
                    help="train-on-ideal beside TSTR: the kept images' real sources recoloured to their cluster's "
                         "true colour (a benchmark-only ceiling; bench_repair.ideal_realism)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or tmp
        build = BUILDS[args.build]
        bench_repair.PALETTE = build.get("palette", bench_repair.PALETTE)
        bench_repair.NAMES[:] = [n for n, _ in bench_repair.PALETTE]
        ds = fb.colored_mnist(f"fb-bench-realism-{args.build}-{args.ratio}", conflict_ratio=args.ratio,
                              output_dir=os.path.join(work, "data"), overwrite=True, **build)
        train, test = ds.match_tags("train"), ds.match_tags("test")
        judge = digit_judge(*arrays(train), epochs=args.judge_epochs)
        x_test, y_test = arrays(test)
        print(f"colour-blind digit judge: {100 * float((judge(x_test) == y_test).float().mean()):.1f}% on the real "
              "test digits", flush=True)
        gen_args = SimpleNamespace(base_model=args.base_model, diffusion_epochs=args.diffusion_epochs,
                                   diffusion_lr=args.diffusion_lr, features="stand-in")
        model, num_clusters, t_train = train_generator(train, gen_args, work, args.ratio)
        val = ds.match_tags("val")
        splits = {"val": val, "test": test}
        refs = {r: bench_repair.cell_reference(train, splits[r]) for r in args.reference}  # matched to the cells
        reference = refs.get("test")  # the figure of the earlier tables (TSTR run with it)
        shown = {k: (v if k != "palette" else [n for n, _ in v]) for k, v in build.items()}
        print(f"\n## Realism of edited cells, Colored MNIST {args.ratio:.1%} conflicting (build {args.build}: {shown}): {num_clusters} X-means colour clusters (10 true colours); generator "
              f"{args.diffusion_epochs} epochs ({t_train:.0f} s); cells filled to {args.per_cell}; edit strength "
              f"{args.edit_strength}, contrast guidance {args.attribute_guidance}, {args.steps} DDIM steps",
              flush=True)
        print(f"two-sample accuracy: median over discriminator seeds {args.seeds}, against the real training images "
              f"and against the unbiased {' / '.join(args.reference)} split(s) weighted to the generated set's digit "
              "x cluster cell mix (cells matched / generated cells; measurement only)")
        common = dict(val_samples=val, run_key=None, epochs=args.downstream_epochs, seed=0)

        def downstream(view, **kw):
            out = []
            for method in ("synthetic", "two_stage"):
                clf = fb.train_classifier(view, method=method, **{**common, **kw})
                fb.apply_classifier(test, clf, "realism_pred", store_logits=False, overwrite=True)
                out.append(100 * fb.evaluate_classifier(test, "realism_pred", aligned_field="bias_aligned").accuracy)
            return " / ".join(f"{v:.1f}" for v in out)

        if args.downstream_epochs:
            t0 = time.time()
            (x, y), (xv, yv) = arrays(train), arrays(val)
            nets = [bench_repair.plain_train(x, y, xv, yv, 0, lff=lff, epochs=args.downstream_epochs)
                    for lff in (False, True)]
            with torch.no_grad():
                plain = [100 * float((net(x_test).argmax(1) == y_test).float().mean()) for net in nets]
            print(f"plain PyTorch vanilla / LfF on real alone: {plain[0]:.1f} / {plain[1]:.1f}% (unbiased test, "
                  f"{args.downstream_epochs} epochs, seed 0; {time.time() - t0:.0f} s)", flush=True)
        print("| setting | images | two-sample acc. vs train | vs cell-matched unbiased test | intensity gen/real | background gen / real | TSTR / TRTR "
              "(unbiased test) | train-on-ideal (its two-sample acc.) | right digit | right colour | "
              "synthetic / two-stage acc. | time |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        made = {}  # generation options -> run key: the filter / weight settings reuse their base setting's images
        for name in args.settings:
            tag = name.strip("+").replace("-", "_").replace(".", "")
            t0 = time.time()
            opts = {"edit_strength": args.edit_strength, "num_inference_steps": args.steps,
                    "attribute_guidance_scale": args.attribute_guidance, **SETTINGS[name]}
            key = made.get(repr(sorted(opts.items())))
            if key is None:
                key = made[repr(sorted(opts.items()))] = "gen_" + tag
                over = opts.pop("oversample", 1)
                generate_balanced(train, "ground_truth", model=model, mode="cells", per_cell=args.per_cell * over,
                                  source="edit", guidance_scale=1.0, guidance_reference="source",
                                  output_dir=os.path.join(work, key), run_key=key, overwrite=True, realism_sample=0, progress=False, **opts)
            t_gen = time.time() - t0
            from fiftyone import ViewField as Fv

            gen = ds.match(Fv("generation.run_key") == key)
            view, train_kw = bench_repair.real_plus(ds, key), {"exclude_field": None}
            if name in FILTERED:
                fb.filter_generated(view, method="discriminator", action="exclude", bottom_fraction=FILTERED[name],
                                    run_key=f"filter_{tag}", overwrite=True, seed=args.filter_seed,
                                    exclude_field=f"out_{tag}", tag=f"low_{tag}", score_field=f"score_{tag}",
                                    within=WITHIN.get(name))
                gen = gen.match(Fv(f"out_{tag}") != True)  # noqa: E712  (the kept ones)
                train_kw = {"exclude_field": f"out_{tag}"}
            if name in WEIGHTED:
                fb.filter_generated(view, method="discriminator", action="weight", run_key=f"weight_{tag}",
                                    overwrite=True, seed=args.filter_seed, weight_field=f"w_{tag}",
                                    tag=f"low_{tag}", score_field=f"score_{tag}")
                train_kw = {"exclude_field": None, "weight_field": f"w_{tag}"}
            reals = [fb.measure_realism(train, gen, "ground_truth", test_samples=test, run_key=f"realism_{tag}",
                                        overwrite=True, seed=s + 1, **(reference or {}))
                     for s in args.seeds]  # +1: not the filter's
            # each two-sample figure's own median over the seeds (the seed with the median figure against the
            # training images need not have the median against the reference); the other columns are those of
            # the seed with the median reported figure (against the reference when there is one)
            train_median = float(np.median([r.two_sample_accuracy for r in reals]))
            by_reference = reference and all(r.reference_two_sample_accuracy is not None for r in reals)
            reported = ((lambda r: r.reference_two_sample_accuracy) if by_reference
                        else (lambda r: r.two_sample_accuracy))
            real = reals[int(np.argsort([reported(r) for r in reals])[len(reals) // 2])]
            fid = fidelity(ds, train, judge, key)  # of all the setting's images (the filter's excluded ones too)
            if name in FILTERED:  # and of the kept ones: what training gets
                kept = fidelity(ds, train, judge, key, exclude_field=f"out_{tag}")
                print(f"fidelity {name}: kept {kept['n']} images: right digit {kept['digit']:.1f}%, right colour "
                      f"{kept['colour']:.1f}% (all {fid['n']}: {fid['digit']:.1f}% / {fid['colour']:.1f}%)", flush=True)
            ideal = "-"
            if args.ideal:
                ir = bench_repair.ideal_realism(ds, train, test, gen, os.path.join(work, f"ideal_{tag}"),
                                                build["color_std"], seed=args.seeds[0] + 1, name=f"ideal_{tag}",
                                                reference=reference)
                ideal = (f"{100 * ir.tstr_accuracy:.1f} ({ir.two_sample_accuracy:.3f} vs train, "
                         f"{bench_repair.reference_report(ir)} vs test)")
                if "val" in refs:  # the ideal twin against the split settings are chosen on
                    iv = bench_repair.ideal_realism(ds, train, test, gen, os.path.join(work, f"ideal_val_{tag}"),
                                                    build["color_std"], seed=args.seeds[0] + 1,
                                                    name=f"idealv_{tag}", reference=refs["val"])
                    ideal += f" [{bench_repair.reference_report(iv)} vs val]"
            ref_txt = bench_repair.reference_report(real) if reference else ""
            if len(reals) > 1 and reference:  # every seed's two figures, the median's first
                ref_txt += " [per seed, train / test: " + ", ".join(
                    f"{r.two_sample_accuracy:.3f} / {r.reference_two_sample_accuracy:.3f}" for r in reals) + "]"
            if "val" in refs:  # the split settings are chosen on: median over the same seeds
                vals = sorted(fb.measure_realism(train, gen, "ground_truth", run_key=f"realism_val_{tag}",
                                                 overwrite=True, seed=s + 1, **refs["val"]).reference_two_sample_accuracy
                              for s in args.seeds)
                ref_txt = (f"val {vals[len(vals) // 2]:.3f} (" + ", ".join(f"{v:.3f}" for v in vals) + ")"
                           + (f"; test {ref_txt}" if ref_txt else ""))
            if args.diagnose:

                print(f"diagnosis {name} (vs the cell-matched {args.reference[0]} split): "
                      f"{report(diagnose(gen, splits[args.reference[0]]))}", flush=True)
            if args.grid_dir:
                save_edit_grid(gen, os.path.join(args.grid_dir, f"{args.build}_{tag}.png"))
            print(f"| {name} | {len(gen)} | {train_median:.3f} | {ref_txt} | "
                  f"{real.intensity_ratio:.2f} | "
                  f"{real.generated_statistics['background_intensity']:.3f} / "
                  f"{real.real_statistics['background_intensity']:.3f} | "
                  f"{100 * real.tstr_accuracy:.1f} / {100 * real.trtr_accuracy:.1f} | {ideal} | {fid['digit']:.1f} | "
                  f"{fid['colour']:.1f} | {downstream(view, **train_kw) if args.downstream_epochs else '-'} | "
                  f"{t_gen:.0f} s |", flush=True)
        ds.delete()
    print(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
