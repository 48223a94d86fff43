"""``make demo``: the main job end to end on the bundled Colored Digits data.

Builds the Colored Digits benchmark into FiftyOne and prints its summary and
balance: the digit classes are balanced, the colour attribute is not, and the
digit x colour table shows how strongly colour predicts the class on train
but not on test. Needs no GPU, network or model weights.
"""

from __future__ import annotations

import argparse

from fairbalance import balance, datasets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="colored-digits-demo", help="FiftyOne dataset name")
    parser.add_argument("--conflict-ratio", type=float, default=0.01)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    dataset = datasets.colored_digits(
        name=args.name,
        conflict_ratio=args.conflict_ratio,
        train_per_class=args.train_per_class,
        test_per_class=args.test_per_class,
        seed=args.seed,
        overwrite=True,
    )
    print(dataset)
    for split in ("train", "test"):
        view = dataset.match_tags(split)
        conflicting = len(view.match({"bias_aligned": False}))
        print(f"\n== {split}: {len(view)} samples, {conflicting} bias-conflicting "
              f"({100 * conflicting / len(view):.1f}%)")
        print(balance.balance_report(view, "ground_truth", attribute_field="color").format())
        print(balance.balance_report(view, "color").format())
    print(f"\nDataset '{dataset.name}' is persistent: open it with `fiftyone app launch {dataset.name}`.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
