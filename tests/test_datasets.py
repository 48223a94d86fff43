import hashlib

import fiftyone as fo
import numpy as np
import pytest
from PIL import Image

from fairbalance.datasets import colored_digits as datasets
from fairbalance.core.validation import FairBalanceError


def _digest(ds):
    h = hashlib.sha256()
    for path, gt, color in zip(*ds.values(["filepath", "ground_truth.label", "color.label"])):
        h.update(open(path, "rb").read())
        h.update(f"{gt}{color}".encode())
    return h.hexdigest()


def test_colored_digits_protocol(digits_dataset):
    ds = digits_dataset
    train, test = ds.match_tags("train"), ds.match_tags("test")
    assert len(train) == 300 and len(test) == 100
    # exactly round(5% of 30) = 2 conflicting images per class on train
    assert len(train.match({"bias_aligned": False})) == 20
    for c in range(10):
        assert len(train.match({"ground_truth.label": str(c), "bias_aligned": False})) == 2
    # aligned <=> colour is the class colour
    names = [n for n, _ in datasets.CLASS_COLORS]
    for gt, color, aligned in zip(*train.values(["ground_truth.label", "color.label", "bias_aligned"])):
        assert aligned == (names[int(gt)] == color)
    # test colours are uniform, not tied to the class: mostly conflicting
    assert len(test.match({"bias_aligned": False})) > 70
    # train and test come from disjoint source digits
    assert not set(train.values("source_index")) & set(test.values("source_index"))
    img = Image.open(ds.first().filepath)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert ds.first().metadata.width == 32
    assert ds.info["colored_digits"]["conflict_ratio"] == 0.05
    assert ds.classes["ground_truth"] == [str(c) for c in range(10)]


def test_colored_digits_colours_follow_class(digits_dataset):
    aligned = digits_dataset.match_tags("train").match({"bias_aligned": True, "ground_truth.label": "0"})
    pixels = np.stack([np.asarray(Image.open(p), dtype=float) for p in aligned.values("filepath")[:10]])
    strokes = pixels[pixels.sum(-1) > 200]
    mean = strokes.mean(0) / strokes.mean(0).max()
    red = np.array(datasets.CLASS_COLORS[0][1], dtype=float)
    assert np.allclose(mean, red / red.max(), atol=0.15)


def test_colored_digits_reproducible(tmp_path):
    kwargs = dict(num_classes=3, train_per_class=8, test_per_class=4, conflict_ratio=0.1, persistent=False)
    a = datasets.colored_digits("fb-repro-a", output_dir=str(tmp_path / "a"), seed=3, **kwargs)
    b = datasets.colored_digits("fb-repro-b", output_dir=str(tmp_path / "b"), seed=3, **kwargs)
    c = datasets.colored_digits("fb-repro-c", output_dir=str(tmp_path / "c"), seed=4, **kwargs)
    try:
        assert _digest(a) == _digest(b)
        assert _digest(a) != _digest(c)
        assert a.match_tags("train").count_values("ground_truth.label") == {"0": 8, "1": 8, "2": 8}
        assert len(a) == 3 * 12
        with pytest.raises(FairBalanceError, match="already exists"):
            datasets.colored_digits("fb-repro-a", output_dir=str(tmp_path / "a"), seed=3, **kwargs)
        again = datasets.colored_digits(
            "fb-repro-a", output_dir=str(tmp_path / "a"), seed=3, overwrite=True, **kwargs
        )
        assert _digest(again) == _digest(b) and len(again) == 36
    finally:
        for name in ("fb-repro-a", "fb-repro-b", "fb-repro-c"):
            if fo.dataset_exists(name):
                fo.delete_dataset(name)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": 11}, "num_classes"),
        ({"conflict_ratio": 1.0}, "conflict_ratio"),
        ({"train_per_class": 0}, "train_per_class"),
        ({"image_size": 4}, "image_size"),
    ],
)
def test_colored_digits_bad_arguments(kwargs, match):
    with pytest.raises(FairBalanceError, match=match):
        datasets.colored_digits("fb-never-created", persistent=False, **kwargs)
    assert not fo.dataset_exists("fb-never-created")


def test_colored_digits_refuses_foreign_folder(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "mine.txt").write_text("user data")
    with pytest.raises(FairBalanceError, match="not written by colored_digits"):
        datasets.colored_digits("fb-foreign", output_dir=str(tmp_path), persistent=False)
    assert (tmp_path / "train" / "mine.txt").exists()


def test_num_conflicting():
    assert datasets.num_conflicting(500, 0.005) == 3
    assert datasets.num_conflicting(100, 0.01) == 1
    assert datasets.num_conflicting(10, 0.005) == 1
    assert datasets.num_conflicting(10, 0.0) == 0


def test_colored_digits_color_distribution():
    ds = datasets.colored_digits("fb-colordist", num_classes=4, train_per_class=100, test_per_class=5,
                                 color_distribution=[0.7, 0.1, 0.1, 0.1], persistent=False)
    try:
        counts = ds.match_tags("train").count_values("color.label")
        assert counts["red"] > 240 and all(counts[c] < 70 for c in ("green", "yellow", "blue"))
        # colour is independent of the digit: every digit appears in the dominant colour
        assert len(ds.match_tags("train").match({"color.label": "red"}).distinct("ground_truth.label")) == 4
        assert ds.info["colored_digits"]["color_distribution"] == pytest.approx([0.7, 0.1, 0.1, 0.1])
    finally:
        ds.delete()
    with pytest.raises(FairBalanceError, match="color_distribution"):
        datasets.colored_digits("fb-never", num_classes=3, color_distribution=[1, 2], persistent=False)
