"""Corrupted MNIST: each class tied to one corruption, a fraction conflicting, unbiased val/test (real digits)."""

import collections

import numpy as np
import pytest

import fairbalance as fb

from fairbalance.datasets import colored_mnist
from fairbalance.datasets import corrupted_mnist as cm


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_corrupted_mnist_follows_the_protocol(tmp_path):
    ds = cm.corrupted_mnist("fb-test-corrupted", conflict_ratio=0.05, num_val=100, num_test=200,
                            output_dir=str(tmp_path / "cm"), overwrite=True)
    try:
        train, test = ds.match_tags("train"), ds.match_tags("test")
        assert (len(train), len(ds.match_tags("val")), len(test)) == (4700, 100, 200)
        labels, kinds, aligned = train.values(["ground_truth.label", "corruption.label", "bias_aligned"])
        assert sum(not a for a in aligned) == round(0.05 * 4700)
        assert all((k == cm.CORRUPTIONS[int(y)]) == a for y, k, a in zip(labels, kinds, aligned))
        # test corruptions are independent of the digit: every class meets several corruptions
        per_class = collections.defaultdict(set)
        for y, k in zip(*test.values(["ground_truth.label", "corruption.label"])):
            per_class[y].add(k)
        assert min(len(v) for v in per_class.values()) >= 4
        with pytest.raises(fb.FairBalanceError, match="already exists"):
            cm.corrupted_mnist("fb-test-corrupted", output_dir=str(tmp_path / "cm2"))
    finally:
        ds.delete()


def test_every_corruption_changes_the_image_and_bad_ratio_fails_first(tmp_path):
    images, _ = colored_mnist.load_mnist_5k()
    rng = np.random.default_rng(0)
    base = np.asarray(cm.corrupt(images[0], "none", rng), dtype=float)
    for kind in cm.CORRUPTIONS:
        assert np.abs(np.asarray(cm.corrupt(images[0], kind, rng), dtype=float) - base).mean() > 1, kind
    with pytest.raises(fb.FairBalanceError, match="conflict_ratio"):
        cm.corrupted_mnist("fb-test-corrupted-bad", conflict_ratio=1.5, output_dir=str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
