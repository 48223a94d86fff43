"""Operators: build the Colored Digits and Colored MNIST benchmark datasets."""

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone.operators.store import ExecutionStore

from fairbalance import create_colored_digits, create_colored_mnist

from ._common import streams_progress
from ._common import LIMITS, refuse
from ._common import default_of, given, operator_config, progress_callback, result_view


class CreateColoredDigits(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "create_colored_digits", "fairbalance: create Colored Digits dataset",
            "Build a colour-biased digits dataset (Colored MNIST protocol) for trying fairbalance",
            "palette",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("name", default="colored-digits", required=True, label="Dataset name")
        ratio = types.Dropdown(label="Bias-conflicting ratio")
        for r in (0.005, 0.01, 0.02, 0.05):
            ratio.add_choice(r, label=f"{r:.1%}")
        inputs.enum("conflict_ratio", ratio.values(), default=default_of(create_colored_digits, "conflict_ratio"),
                    view=ratio)
        inputs.int("train_per_class", default=default_of(create_colored_digits, "train_per_class"), min=1,
                   max=LIMITS["train_per_class"], label="Train images per class")
        inputs.int("test_per_class", default=default_of(create_colored_digits, "test_per_class"), min=1,
                   max=LIMITS["test_per_class"], label="Test images per class")
        inputs.int("num_classes", default=default_of(create_colored_digits, "num_classes"), min=2, max=10,
                   label="Classes")
        inputs.int("image_size", default=default_of(create_colored_digits, "image_size"), min=8,
                   max=LIMITS["image_size"], label="Image size (px)")
        inputs.int("seed", default=default_of(create_colored_digits, "seed"), max=LIMITS["seed"], label="Seed")
        inputs.bool("overwrite", default=default_of(create_colored_digits, "overwrite"),
                    label="Overwrite an existing dataset of that name")
        _check_name(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Create Colored Digits"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        dataset = create_colored_digits(
            name=p["name"], progress=progress_callback(ctx, "Writing images"),
            **given(p, ("num_classes", "train_per_class", "test_per_class", "conflict_ratio", "image_size", "seed",
                        "overwrite")))
        train = dataset.match_tags("train")
        conflicting = len(train.match({"bias_aligned": False}))
        note = _ratio_note(p.get("conflict_ratio", default_of(create_colored_digits, "conflict_ratio")),
                           conflicting, len(train))
        made = (f"Colored Digits '{dataset.name}' created: {len(train)} train and {len(dataset) - len(train)} test "
                "samples")
        opened = show_new_dataset(ctx, dataset, made + (f". {note}" if note else ""))
        return {
            "opened": opened,
            "dataset": dataset.name,
            "num_samples": len(dataset),
            "num_train": len(train),
            "num_test": len(dataset.match_tags("test")),
            "train_bias_conflicting": conflicting,
            "note": note,
        }

    def resolve_output(self, ctx):
        if on_home_page(ctx):
            return None
        return result_view(
            ctx, "Colored Digits created",
            ("dataset", "str", "Dataset"),
            ("num_train", "int", "Train samples"),
            ("num_test", "int", "Test samples"),
            ("train_bias_conflicting", "int", "Bias-conflicting train samples"),
            ("note", "str", "Note"),
        )


def _ratio_note(requested, conflicting, num_train):
    """Say so when the dataset's size cannot give the bias-conflicting ratio that was asked for."""
    actual = conflicting / max(1, num_train)
    if abs(actual - requested) <= max(0.002, 0.2 * requested):
        return None
    return (f"Asked for {requested:.1%} bias-conflicting; with {num_train} training images that is "
            f"{conflicting} images = {actual:.1%}. More images per class get closer to the ratio.")


class CreateColoredMnist(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "create_colored_mnist", "fairbalance: create Colored MNIST dataset",
            "Build Colored MNIST (LfF protocol) from 5,000 real MNIST digits: biased train, unbiased val/test",
            "palette",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("name", default="colored-mnist", required=True, label="Dataset name")
        ratio = types.Dropdown(label="Bias-conflicting ratio")
        for r in (0.005, 0.01, 0.02, 0.05):
            ratio.add_choice(r, label=f"{r:.1%}")
        inputs.enum("conflict_ratio", ratio.values(), default=default_of(create_colored_mnist, "conflict_ratio"), view=ratio)
        inputs.int("num_val", default=default_of(create_colored_mnist, "num_val"), min=0, max=LIMITS["num_val"],
                   label="Validation images (unbiased)")
        inputs.int("num_test", default=default_of(create_colored_mnist, "num_test"), min=1, max=LIMITS["num_test"],
                   label="Test images (unbiased)")
        inputs.int("seed", default=default_of(create_colored_mnist, "seed"), min=0, max=LIMITS["seed"], label="Seed")
        inputs.bool("overwrite", default=default_of(create_colored_mnist, "overwrite"),
                    label="Overwrite an existing dataset of that name")
        _check_name(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Create Colored MNIST"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        dataset = create_colored_mnist(name=p["name"], persistent=True, progress=progress_callback(ctx, "Writing images"),
                                **given(p, ("conflict_ratio", "num_val", "num_test", "seed", "overwrite")))
        train = dataset.match_tags("train")
        opened = show_new_dataset(ctx, dataset, f"Colored MNIST '{dataset.name}' created: {len(train)} train samples")
        return {
            "opened": opened,
            "dataset": dataset.name,
            "num_train": len(train),
            "num_val": len(dataset.match_tags("val")),
            "num_test": len(dataset.match_tags("test")),
            "train_bias_conflicting": len(train.match({"bias_aligned": False})),
        }

    def resolve_output(self, ctx):
        if on_home_page(ctx):
            return None
        return result_view(
            ctx, "Colored MNIST created",
            ("dataset", "str", "Dataset"),
            ("num_train", "int", "Train samples"),
            ("num_val", "int", "Validation samples"),
            ("num_test", "int", "Test samples"),
            ("train_bias_conflicting", "int", "Bias-conflicting train samples"),
        )


#: The execution store (FiftyOne's key-value store of plugins, scoped to a dataset) where a dataset created from the
#: home page keeps what was made until its page is up: :class:`ShowCreatedNotice` says it there.
NOTICES = "fairbalance_notices"
NOTICE_TTL = 600  # seconds a notice waits for its dataset's page (e.g. the tab was closed meanwhile)


def show_new_dataset(ctx, dataset, summary):
    """Created from the home page (no dataset open): open the new dataset, since the home page's list is not
    refreshed by the App ("No datasets yet" until a reload), and say what was made once its page is up (the result
    dialog would come back as the form once the page changes). With a dataset open the user's place is kept and
    the result dialog shows.

    A notification sent along with the open would show on the page being left and go with it: the App mounts the
    dataset's page ~1 s later and the notification vanishes then (measured in Chromium: shown 0.9 s, before the
    new dataset was on screen), so a person missed it. It waits in the new dataset's execution store instead, and
    :class:`ShowCreatedNotice`, which the App runs once the dataset's page is up, shows it there (its usual 3 s)."""
    if ctx.dataset_name is None:
        ExecutionStore.create(NOTICES, dataset._doc.id).set("created", summary, ttl=NOTICE_TTL)
        ctx.ops.open_dataset(dataset.name)
        return True
    return False


class ShowCreatedNotice(foo.Operator):
    """Run by the App whenever a dataset's page is up (``on_dataset_open``): the notice of what was made, when
    the dataset was just created from the home page (:func:`show_new_dataset`); otherwise nothing (one read)."""

    @property
    def config(self):
        return foo.OperatorConfig(name="show_created_notice", label="fairbalance: what was created",
                                  unlisted=True, on_dataset_open=True)

    def execute(self, ctx):
        if ctx.dataset is None:
            return
        store = ctx.store(NOTICES)
        summary = store.get("created")
        if summary and store.delete("created"):  # said once, even with the dataset open in two tabs
            ctx.ops.notify(summary, variant="success")


def on_home_page(ctx):
    """The result of a run from the home page is its notification and the opened dataset: no dialog."""
    return ctx.dataset_name is None and bool((ctx.results or {}).get("opened"))


def _check_name(ctx, inputs):
    """An existing dataset name is said before Execute, in the App's words (the SDK said "pass overwrite=True")."""
    import fiftyone as fo

    name = (ctx.params.get("name") or "").strip()
    if name and not ctx.params.get("overwrite") and fo.dataset_exists(name):
        refuse(inputs, "name_taken", f"A dataset named '{name}' exists already: choose another name, or tick "
                                     "'Overwrite an existing dataset of that name' to replace it")
