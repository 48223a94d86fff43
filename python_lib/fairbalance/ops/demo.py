"""``make demo``: the main job end to end on the bundled Colored Digits data.

1. Build the Colored Digits benchmark into FiftyOne and print its balance:
   classes are balanced, but colour predicts the class on train, not on test.
2. Audit: SA features for the attribute "colors" and X-means pseudo-labels,
   when CLIP weights are available on this machine (skipped with a note
   otherwise: no download is attempted offline).
3. Hardness: a GCE-biased classifier tags the samples it gets wrong (its
   error set: no bias labels needed) as likely bias-conflicting.
4. Vanilla vs. debiased classifiers (JTT upweighting of the tagged samples,
   and LfF), evaluated on the unbiased test split and written back.
5. Repair: a Colored Digits set with a hidden colour imbalance (55/20/12/8/5%);
   a class-conditional diffusion model trained on its clusters generates the
   same number per cluster; the colour of every generated image is read off
   the image (nearest palette colour of its strokes), not from the plan, and
   the colour entropy before/after is printed.
6. With ``--full`` only: a row of the README's cross-build repair table
   (Colored MNIST build a, 1% conflicting) with that row's reduced settings:
   colour clusters (X-means on the mean stroke colour, the offline stand-in
   for CLIP features), a digit x cluster model trained 3 epochs, every cell
   filled to 5 images by editing real digits (DDIM inversion, background
   kept), and two-stage training (CE + SupCon on the generated samples, the
   head on the real ones) compared with vanilla on the unbiased test split.

The default is sized for a first look (a few minutes on 2 CPU cores); it ends
by printing how to open the App on what it made. ``--full`` adds the cells
repair (about 470 s more of CPU, one thread: measured in the README).
Needs no GPU, network or weights it cannot find.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from fairbalance.core import models
from fairbalance.datasets import colored_digits as datasets
from fairbalance.find import balance
from fairbalance.find.audit import audit_balance
from fairbalance.train.classifier import apply_classifier, evaluate_classifier, train_classifier
from fairbalance.generate.diffusion import train_conditional_diffusion
from fairbalance.generate.generation import generate_balanced
from fairbalance.tag.hardness import compute_hardness

#: ``make demo``: a first look in a few minutes on 2 CPU cores. Its repair model is a narrower U-Net trained
#: 300 steps (60 epochs of 300 images), after which nearly all its images show the colour they were asked for
#: (24 of 25 measured). ``--full`` runs the same and then the cells repair (``_cells_repair``).
QUICK = dict(train_per_class=100, test_per_class=20, image_size=16, epochs=40, balance_epochs=60,
             balance_per_class=60, balance_total=250, balance_channels=(16, 32, 32))
#: What the README's cross-build table measured on build a, 1% (3-epoch generator, cells filled to 5, inversion +
#: kept background, 100 classifier epochs, best val epoch; 3 training seeds), printed beside the demo's figures.
README_ROW = {"vanilla": "40.3 ± 1.3 (fairbalance vanilla, 3 seeds)",
              "two_stage": "83.4 ± 0.2 (3 seeds)", "colour": "45.8% of 402 images"}


def _audit(dataset, clip_model: str, pretrained: str | None) -> str | None:
    """SA features + pseudo-labels; the label field, or None when the CLIP weights are not here."""
    print(f"\n== Audit: SA features for 'colors' with CLIP {clip_model}/{pretrained}")
    try:
        models.load_clip(clip_model, pretrained)
    except models.ModelNotFoundError as e:
        print(f"  skipped: {e}")
        return None
    audit = audit_balance(dataset, "colors", model=clip_model, pretrained=pretrained, attribute_field="color",
                          overwrite=True)
    for r in audit.sa_features.related_texts[:5]:
        print(f"  related text {r['score']:.3f}  {r['text'][:90]}")
    print(audit.report.format())
    return audit.pseudo_labels.label_field


def _repair(name: str, args, have_clip: bool) -> None:
    """Step 5: generate the same number of images per cluster of an implicitly imbalanced set."""
    seed = args.seed
    dataset = datasets.colored_digits(
        name=name, num_classes=5, train_per_class=args.balance_per_class, test_per_class=20,
        color_distribution=[0.55, 0.2, 0.12, 0.08, 0.05], seed=seed, overwrite=True,
    )
    train = dataset.match_tags("train")
    print(f"\n== Repair: '{name}', {len(train)} training images with a hidden colour imbalance")
    field = _audit(train, args.clip_model, args.clip_pretrained or None) if have_clip else None
    if field is None:
        field = "color"
        print("  conditions: the 'color' labels (with CLIP weights, the X-means clusters of the SA features)")
    before_color = balance.balance_report(train, "color")
    narrow = {"block_out_channels": tuple(args.balance_channels)} if args.balance_channels else {}
    model = train_conditional_diffusion(train, field, image_size=16, epochs=args.balance_epochs, lr=1e-3, seed=seed,
                                        overwrite=True, **narrow)  # resumes only when the data and settings match
    print(f"  diffusion model: {model.steps} training steps")
    res = generate_balanced(train, field, model=model, total=args.balance_total, guidance_scale=2.0,
                            num_inference_steps=20, seed=seed, overwrite=True)
    print(f"  generated {res.num_added} images: {res.added} (tag 'generated', field 'generation')")
    real = balance.balance_report(train, "color")
    generated = dataset.match_tags("generated")
    shown = Counter(datasets.nearest_color(p) for p in generated.values("filepath"))
    both = [real.counts.get(c, 0) + shown.get(c, 0) for c in real.counts]
    print(f"  colours the generated images show (nearest palette colour of the strokes): {dict(shown)}")
    print(f"  colour entropy of the training set, real -> real + generated: {before_color.entropy:.3f} -> "
          f"{balance.entropy(both):.3f} (max ln {len(real.counts)} = {real.max_entropy:.3f})")


def _stroke_features(view) -> list:
    """The offline stand-in for CLIP SA features (as the README's repair rows): mean RGB of the stroke pixels."""
    import numpy as np

    from fairbalance.core import images

    out = []
    for path in view.values("filepath"):
        a = np.asarray(images.load_rgb(path), dtype=np.float32) / 255.0
        strokes = a[a.max(-1) > 0.3]
        out.append((strokes.mean(0) if len(strokes) else a.reshape(-1, 3).mean(0)).astype(np.float32))
    return out


def _cells_repair(args) -> str:
    """Step 6 (``--full``): the README's cross-build repair row (build a, 1%), reduced as that row was."""
    from fiftyone import ViewField as F

    from fairbalance.datasets.colored_mnist import colored_mnist
    from fairbalance.find.pseudo_labels import compute_pseudo_labels

    name, start = f"{args.name}-mnist", time.time()
    ds = colored_mnist(name, conflict_ratio=0.01, seed=0, color_std=0.05, num_val=200, num_test=1000,
                       persistent=True, overwrite=True)  # the README's build a
    train, val, test = ds.match_tags("train"), ds.match_tags("val"), ds.match_tags("test")
    if args.cells_limit:
        train = train.take(args.cells_limit, seed=args.seed)
    print(f"\n== Cells repair (--full): '{name}', Colored MNIST 1% conflicting (the README's build a), "
          f"{len(train)} training images")
    train.set_values("sa_features", _stroke_features(train))  # colour stand-in features: no CLIP weights offline
    clusters = compute_pseudo_labels(train, kmax=20, seed=0, overwrite=True)
    print(f"  colour clusters (X-means on the mean stroke colour): {clusters.num_clusters}")
    size = {"block_out_channels": tuple(args.cells_channels)} if args.cells_channels else {}
    model = train_conditional_diffusion(train, "ground_truth", attribute_field="sa_cluster", epochs=args.cells_epochs,
                                        lr=1e-3, batch_size=64, seed=0, run_key="cells_model", overwrite=True, **size)
    gen = generate_balanced(train, "ground_truth", model=model, mode="cells", per_cell=args.per_cell, source="edit",
                            edit_strength=0.5, guidance_scale=1.0, attribute_guidance_scale=4.0,
                            guidance_reference="source", inversion=True, keep_background=True,
                            num_inference_steps=args.cells_steps, seed=args.seed, run_key="cells", overwrite=True,
                            realism_sample=0)
    generated = ds.match(F("generation.run_key") == "cells")
    real_clusters, real_colors = train.values(["sa_cluster.label", "color.label"])
    majority = {c: Counter(col for k, col in zip(real_clusters, real_colors) if k == c).most_common(1)[0][0]
                for c in set(real_clusters)}
    asked = [majority[c] for c in generated.values("sa_cluster.label")]
    shown = [datasets.nearest_color(p) for p in generated.values("filepath")]
    right = sum(a == b for a, b in zip(asked, shown))
    print(f"  generator: {model.steps} training steps; {gen.num_added} images generated (every digit x cluster "
          f"cell filled to {args.per_cell} by editing real digits), {right} of {len(asked)} "
          f"({100 * right / max(1, len(asked)):.1f}%) show the colour of their cell (its cluster's majority colour; "
          f"README: {README_ROW['colour']})")
    real_plus = ds.select(train.values("id") + generated.values("id"))
    for method in ("vanilla", "two_stage"):
        clf = train_classifier(train if method == "vanilla" else real_plus, method=method, val_samples=val,
                               epochs=args.cells_train_epochs, seed=args.seed, run_key=f"cells_{method}_classifier",
                               overwrite=True)
        apply_classifier(test, clf, f"cells_{method}_predictions")
        ev = evaluate_classifier(test, f"cells_{method}_predictions", attribute_field="color",
                                 aligned_field="bias_aligned", run_key=f"cells_{method}_eval", overwrite=True)
        print(f"  {method:<9} unbiased test accuracy {100 * ev.accuracy:5.1f}%  bias-conflicting "
              f"{100 * ev.conflicting_accuracy:5.1f}%  (README, build a 1%: {README_ROW[method]})")
    print(f"  cells repair: {(time.time() - start) / 60:.1f} min")
    return name


def _open_the_app(names: list[str], repaired: str | None, cells: str | None = None) -> None:
    """The last lines: how to look at what the demo made in the App, and what the Balance panel shows."""
    print("\n== Open it in the FiftyOne App")
    print(f"  export FIFTYONE_PLUGINS_DIR={_plugins_dir()}")
    print(f"  fiftyone app launch {names[0]}")
    print(f"  Datasets made (persistent): {', '.join(names)}.")
    if repaired:
        print(f"  In the App, pick '{repaired}', then '+' beside the Samples tab -> Balance: label field 'color' "
              "shows the colour bars of the real samples beside real + generated (before / after the repair), "
              "and the entropy of both; attribute 'ground_truth' adds the class x colour heat maps.")
    if cells:
        print(f"  '{cells}' (--full): Balance with label field 'ground_truth', attribute 'sa_cluster' shows the digit x "
              "cluster cells before / after they were filled; the evaluations cells_vanilla_eval and "
              "cells_two_stage_eval side by side in the run history.")
    print("  Press ` in the App for the operator browser and type 'fairbalance' for every step of this demo.")


def _plugins_dir() -> str:
    """The folder holding this checkout (FiftyOne finds the plugin's fiftyone.yml one level down)."""
    import os

    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # python_lib/fairbalance/ops
    if os.path.isfile(os.path.join(repo, "fiftyone.yml")):
        return os.path.dirname(repo)
    return "/path/to/folder-containing-fairbalance"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true",
                        help="add the cells repair on Colored MNIST with two-stage training (~8 more minutes)")
    parser.add_argument("--name", default="colored-digits-demo", help="FiftyOne dataset name")
    parser.add_argument("--conflict-ratio", type=float, default=0.01)
    parser.add_argument("--train-per-class", type=int)
    parser.add_argument("--test-per-class", type=int)
    parser.add_argument("--image-size", type=int, help="px of the Colored Digits images")
    parser.add_argument("--epochs", type=int, help="classifier epochs (0 skips training)")
    parser.add_argument("--balance-epochs", type=int,
                        help="conditional diffusion epochs for the repair step (0 skips it)")
    parser.add_argument("--balance-per-class", type=int, help="repair set: images per digit")
    parser.add_argument("--balance-total", type=int, help="repair step: images generated in all")
    parser.add_argument("--balance-channels", type=int, nargs="+",
                        help="repair step: the U-Net's channels per level (default: 16 32 32; --full: the library's)")
    parser.add_argument("--cells-epochs", type=int, default=3, help="--full: digit x cluster model epochs")
    parser.add_argument("--per-cell", type=int, default=5, help="--full: images per digit x cluster cell")
    parser.add_argument("--cells-steps", type=int, default=20, help="--full: DDIM steps of each edit")
    parser.add_argument("--cells-train-epochs", type=int, default=100,
                        help="--full: epochs of the vanilla and two-stage classifiers")
    parser.add_argument("--cells-limit", type=int, help="--full: use only this many training images (all 3,800)")
    parser.add_argument("--cells-channels", type=int, nargs="+",
                        help="--full: the generator U-Net's channels per level (default: the library's 32 64 64)")
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--clip-pretrained", default="openai")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    for key, value in QUICK.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not sys.stdout.isatty():  # a log, not a terminal: step lines only, no carriage-return progress bars
        import fiftyone as fo

        fo.config.show_progress_bars = False

    dataset = datasets.colored_digits(
        name=args.name, conflict_ratio=args.conflict_ratio, train_per_class=args.train_per_class,
        test_per_class=args.test_per_class, image_size=args.image_size, seed=args.seed, overwrite=True,
    )
    print(dataset)
    train, test = dataset.match_tags("train"), dataset.match_tags("test")
    for split, view in (("train", train), ("test", test)):
        conflicting = len(view.match({"bias_aligned": False}))
        print(f"\n== {split}: {len(view)} samples, {conflicting} bias-conflicting "
              f"({100 * conflicting / len(view):.1f}%)")
        print(balance.balance_report(view, "ground_truth", attribute_field="color").format())
        print(balance.balance_report(view, "color").format())

    have_clip = _audit(dataset, args.clip_model, args.clip_pretrained or None) is not None

    if args.epochs > 0:
        common = dict(seed=args.seed)
        n_conf = len(train.match({"bias_aligned": False}))
        hard = compute_hardness(train, overwrite=True, **common)  # the GCE model's error set: no K to choose
        tagged = train.match_tags(hard.tag)
        found = len(tagged.match({"bias_aligned": False}))
        print(f"\n== Hardness: tagged {hard.num_tagged} samples '{hard.tag}' (the biased model's errors); "
              f"{100 * found / max(1, len(tagged)):.0f}% are truly bias-conflicting (random tagging: "
              f"{100 * n_conf / len(train):.0f}%), {found} of the {n_conf} found")
        for name, extra in (("vanilla", {}), ("jtt", {"method": "jtt", "hard_tag": hard.tag}),
                            ("lff", {"method": "lff"})):
            clf = train_classifier(train, run_key=f"{name}_classifier", overwrite=True, epochs=args.epochs,
                                   **common, **extra)
            apply_classifier(test, clf, f"{name}_predictions")
            ev = evaluate_classifier(test, f"{name}_predictions", attribute_field="color",
                                     aligned_field="bias_aligned", run_key=f"{name}_eval", overwrite=True)
            print(f"  {name:<7} test accuracy {100 * ev.accuracy:5.1f}%  bias-conflicting "
                  f"{100 * ev.conflicting_accuracy:5.1f}%  worst group {100 * ev.worst_group_accuracy:5.1f}%")

    repaired = f"{args.name}-imbalanced" if args.balance_epochs > 0 else None
    if repaired:
        _repair(repaired, args, have_clip)
    cells = _cells_repair(args) if args.full and args.cells_epochs > 0 else None
    print(f"\nDemo finished in {(time.time() - start) / 60:.1f} min.")
    _open_the_app([n for n in (dataset.name, repaired, cells) if n], repaired, cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
