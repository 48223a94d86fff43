"""Operators: build the Colored Digits and Colored MNIST benchmark datasets."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import datasets
from fairbalance.colored_mnist import colored_mnist

from ._common import operator_config, progress_callback, result_view


class CreateColoredDigits(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "create_colored_digits", "fairbalance: create Colored Digits dataset",
            "Build a colour-biased digits dataset (Colored MNIST protocol) for trying fairbalance",
            "palette", dynamic=False,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("name", default="colored-digits", required=True, label="Dataset name")
        ratio = types.Dropdown(label="Bias-conflicting ratio")
        for r in (0.005, 0.01, 0.02, 0.05):
            ratio.add_choice(r, label=f"{r:.1%}")
        inputs.enum("conflict_ratio", ratio.values(), default=0.01, view=ratio)
        inputs.int("train_per_class", default=500, min=1, label="Train images per class")
        inputs.int("test_per_class", default=100, min=1, label="Test images per class")
        inputs.int("num_classes", default=10, min=2, max=10, label="Classes")
        inputs.int("image_size", default=32, min=8, label="Image size (px)")
        inputs.int("seed", default=0, label="Seed")
        inputs.bool("overwrite", default=False, label="Overwrite an existing dataset of that name")
        return types.Property(inputs, view=types.View(label="Create Colored Digits"))

    def execute(self, ctx):
        p = ctx.params
        dataset = datasets.colored_digits(
            name=p["name"],
            num_classes=int(p.get("num_classes", 10)),
            train_per_class=int(p.get("train_per_class", 500)),
            test_per_class=int(p.get("test_per_class", 100)),
            conflict_ratio=float(p.get("conflict_ratio", 0.01)),
            image_size=int(p.get("image_size", 32)),
            seed=int(p.get("seed", 0)),
            overwrite=bool(p.get("overwrite", False)),
            progress=progress_callback(ctx, "Writing images"),
        )
        conflicting = len(dataset.match_tags("train").match({"bias_aligned": False}))
        return {
            "dataset": dataset.name,
            "num_samples": len(dataset),
            "num_train": len(dataset.match_tags("train")),
            "num_test": len(dataset.match_tags("test")),
            "train_bias_conflicting": conflicting,
        }

    def resolve_output(self, ctx):
        return result_view(
            "Colored Digits created",
            ("dataset", "str", "Dataset"),
            ("num_train", "int", "Train samples"),
            ("num_test", "int", "Test samples"),
            ("train_bias_conflicting", "int", "Bias-conflicting train samples"),
        )


class CreateColoredMnist(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "create_colored_mnist", "fairbalance: create Colored MNIST dataset",
            "Build Colored MNIST (LfF protocol) from 5,000 real MNIST digits: biased train, unbiased val/test",
            "palette", dynamic=False,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("name", default="colored-mnist", required=True, label="Dataset name")
        ratio = types.Dropdown(label="Bias-conflicting ratio")
        for r in (0.005, 0.01, 0.02, 0.05):
            ratio.add_choice(r, label=f"{r:.1%}")
        inputs.enum("conflict_ratio", ratio.values(), default=0.01, view=ratio)
        inputs.int("num_val", default=200, min=0, label="Validation images (unbiased)")
        inputs.int("num_test", default=1000, min=1, label="Test images (unbiased)")
        inputs.int("seed", default=0, min=0, label="Seed")
        inputs.bool("overwrite", default=False, label="Overwrite an existing dataset of that name")
        return types.Property(inputs, view=types.View(label="Create Colored MNIST"))

    def execute(self, ctx):
        p = ctx.params
        casts = {"conflict_ratio": float, "num_val": int, "num_test": int, "seed": int, "overwrite": bool}
        kwargs = {k: cast(p[k]) for k, cast in casts.items() if p.get(k) is not None}
        dataset = colored_mnist(
            name=p["name"], persistent=True, progress=progress_callback(ctx, "Writing images"), **kwargs
        )
        train = dataset.match_tags("train")
        return {
            "dataset": dataset.name,
            "num_train": len(train),
            "num_val": len(dataset.match_tags("val")),
            "num_test": len(dataset.match_tags("test")),
            "train_bias_conflicting": len(train.match({"bias_aligned": False})),
        }

    def resolve_output(self, ctx):
        return result_view(
            "Colored MNIST created",
            ("dataset", "str", "Dataset"),
            ("num_train", "int", "Train samples"),
            ("num_val", "int", "Validation samples"),
            ("num_test", "int", "Test samples"),
            ("train_bias_conflicting", "int", "Bias-conflicting train samples"),
        )
