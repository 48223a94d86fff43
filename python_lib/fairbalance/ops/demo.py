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
Needs no GPU, network or weights it cannot find.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from fairbalance.core import models
from fairbalance.datasets import colored_digits as datasets
from fairbalance.find import balance
from fairbalance.find.audit import audit_balance
from fairbalance.train.classifier import apply_classifier, evaluate_classifier, train_classifier
from fairbalance.generate.diffusion import train_conditional_diffusion
from fairbalance.generate.generation import generate_balanced
from fairbalance.tag.hardness import compute_hardness


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
    model = train_conditional_diffusion(train, field, image_size=16, epochs=args.balance_epochs, lr=1e-3, seed=seed,
                                        overwrite=True)  # resumes only when the data and settings are the same
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="colored-digits-demo", help="FiftyOne dataset name")
    parser.add_argument("--conflict-ratio", type=float, default=0.01)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=30, help="classifier epochs (0 skips training)")
    parser.add_argument("--balance-epochs", type=int, default=40,
                        help="conditional diffusion epochs for the repair step (0 skips it)")
    parser.add_argument("--balance-per-class", type=int, default=200, help="repair set: images per digit")
    parser.add_argument("--balance-total", type=int, default=2000, help="repair step: images generated in all")
    parser.add_argument("--clip-model", default="ViT-B-32")
    parser.add_argument("--clip-pretrained", default="openai")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not sys.stdout.isatty():  # a log, not a terminal: step lines only, no carriage-return progress bars
        import fiftyone as fo

        fo.config.show_progress_bars = False

    dataset = datasets.colored_digits(
        name=args.name, conflict_ratio=args.conflict_ratio, train_per_class=args.train_per_class,
        test_per_class=args.test_per_class, seed=args.seed, overwrite=True,
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

    if args.balance_epochs > 0:
        _repair(f"{args.name}-imbalanced", args, have_clip)
        print(f"\nDatasets '{dataset.name}' and '{args.name}-imbalanced' are persistent: open them with "
              f"`fiftyone app launch` and the Balance panel.")
    else:
        print(f"\nDataset '{dataset.name}' is persistent: open it with `fiftyone app launch {dataset.name}`.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
