"""One loader per saved model family, one registry (issue #23): ``core.models`` resolves a user's model argument
(a loaded model, its folder, or the key of the run that trained it) for the classifier, the conditional diffusion
model and the per-group adapters, each read by the ``from_pretrained`` of the module that owns its class."""

from __future__ import annotations

import os

import pytest
import torch

import fairbalance as fb
from fairbalance.core import models, runs
from fairbalance.core.validation import FairBalanceError
from fairbalance.generate.diffusion_model import LABELS_FILE, ConditionalDiffusionModel
from fairbalance.generate.lora.adapters import MANIFEST_FILE, GroupAdapters
from fairbalance.train import training
from fairbalance.train.network import TrainedClassifier

FAST = dict(backbone="mlp", image_size=16, epochs=1, batch_size=64)


def test_every_saved_family_is_registered_by_its_owner():
    families = {f.name: (f.model_class, f.marker, f.run_method, f.run_field) for f in models.SAVED_FAMILIES.values()}
    assert families == {
        "classifier": (TrainedClassifier, "config.json", "train_classifier", "checkpoint"),
        "conditional diffusion model": (ConditionalDiffusionModel, LABELS_FILE, "conditional_diffusion", "model_dir"),
        "per-group adapters": (GroupAdapters, MANIFEST_FILE, "finetune_per_group", "output_dir"),
    }
    for family in models.SAVED_FAMILIES.values():
        assert family.from_pretrained == family.model_class.from_pretrained, family.name


@pytest.mark.parametrize("family", ["classifier", "conditional diffusion model", "per-group adapters"])
def test_a_missing_folder_or_marker_fails_fast_with_one_clear_error(family, tmp_path):
    with pytest.raises(models.ModelNotFoundError, match=f"No {family} in .*nope: the folder does not exist"):
        models.load_saved(family, str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    marker = models.SAVED_FAMILIES[family].marker
    with pytest.raises(models.ModelNotFoundError, match=f"No {family} in .*empty \\({marker} missing\\)"):
        models.load_saved(family, str(tmp_path / "empty"))
    with pytest.raises(FairBalanceError, match="as its folder"):
        models.load_saved(family, 3)


def test_a_classifier_from_its_object_folder_or_run(digits_copy, tmp_path):
    train = digits_copy.match_tags("train")
    clf = fb.train_classifier(train, run_key="clf", **FAST)
    paths = train.limit(4).values("filepath")
    from_run = runs.recorded_model(digits_copy, "classifier", None, "clf", "model", "classifier_run")
    from_folder = models.load_saved("classifier", clf.checkpoint)
    assert from_run.checkpoint == from_folder.checkpoint == clf.checkpoint
    assert torch.equal(training.predict(from_run, paths), training.predict(clf, paths))
    assert models.load_saved("classifier", clf) is clf
    # save_pretrained / from_pretrained: one pair, the files as they were (model.pt, config.json)
    folder = clf.save_pretrained(str(tmp_path / "copy"))
    assert sorted(os.listdir(folder)) == ["config.json", "model.pt"]
    assert torch.equal(training.predict(TrainedClassifier.from_pretrained(folder), paths), training.predict(clf, paths))
    with pytest.raises(FairBalanceError, match="No 'train_classifier' run 'nope'"):
        runs.recorded_model(digits_copy, "classifier", None, "nope", "model", "classifier_run")
    (tmp_path / "copy" / "model.pt").write_bytes(b"truncated")
    with pytest.raises(models.ModelNotFoundError, match="classifier at .*copy could not be loaded: its files are corrupt"):
        training.load_classifier(folder)
