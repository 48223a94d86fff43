"""TrainConfig is the one source of the classifier's hyperparameters (issue #23).

The public writer's keyword defaults, the biased models of hardness and discovery, the trainer's input and
what a run and a checkpoint record are all one TrainConfig; older records (without a newer field) still load.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict, fields, replace

import pytest
import torch

import fairbalance as fb
from fairbalance.core import runs
from fairbalance.tag import discovery, hardness
from fairbalance.train import training
from fairbalance.train.network import RESOLVED, TrainConfig

FAST = dict(backbone="mlp", image_size=16, epochs=2, batch_size=64)
FIELDS = {f.name: f for f in fields(TrainConfig)}


def _config_keywords(fn):
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if n in FIELDS}


def test_keyword_defaults_are_train_config_defaults():
    public = _config_keywords(fb.train_classifier)
    # every setting a user can give is a keyword (classes and the resolved fields are not settings)
    assert set(public) == set(FIELDS) - set(RESOLVED)
    assert public == {n: FIELDS[n].default for n in public}
    assert TrainConfig() == TrainConfig(**public)
    # the biased models of hardness and discovery: one config, whose own defaults differ only where stated
    biased = hardness.BIASED_MODEL
    assert (biased.method, biased.epochs) == ("biased", 10)
    assert replace(biased, method=TrainConfig.method, epochs=TrainConfig.epochs) == TrainConfig()
    for fn in (fb.compute_hardness_tags, fb.discover_slices):  # (discovery's ``method`` is its slicing method)
        given = {n: v for n, v in _config_keywords(fn).items() if n not in ("label_field", "method")}
        assert given and given == {n: getattr(biased, n) for n in given}, fn.__name__
    assert set(hardness.TRAINING_SETTINGS) <= set(_config_keywords(fb.compute_hardness_tags))
    assert set(discovery.TRAINING_SETTINGS) <= set(_config_keywords(fb.discover_slices))


def test_the_run_records_the_config_of_the_call(digits_copy):
    train = digits_copy.match_tags("train")
    call = dict(FAST, lr=3e-3, seed=2, normalize="dataset", weight_decay=1e-4)
    clf = fb.train_classifier(train, run_key="cfg", **call)
    asked = TrainConfig(**call)
    # what was trained: the call's config with the fields the trainer resolves from the data
    resolved = {n: getattr(clf.config, n) for n in RESOLVED}
    assert clf.config == replace(asked, image_size=[16, 16], **resolved)
    assert clf.config.classes == [str(c) for c in range(10)] and clf.config.mean is not None
    cfg = runs.get_run_config(digits_copy, "cfg")
    assert TrainConfig.from_dict(cfg["train_config"]) == clf.config
    # the run's settings are the call's (``method`` recorded as ``training_method``, as older runs have it)
    expected = {k: v for k, v in asked.settings().items() if k not in ("num_workers", "group_field", "dro_step")}
    assert {k: cfg.get("training_method" if k == "method" else k, "missing") for k in expected} == expected
    assert "group_field" not in cfg and "num_workers" not in cfg  # older runs' configs stay as they were


def test_the_trainer_takes_a_config_and_leaves_it_as_given(digits_copy):
    train = digits_copy.match_tags("train")
    config = TrainConfig(method="biased", **FAST)
    clf = training.train_classifier(train, config)
    assert config == TrainConfig(method="biased", **FAST)  # the caller's config is not changed
    assert clf.config.method == "biased" and clf.config.classes and clf.config.image_size == [16, 16]
    with pytest.raises(TypeError):
        training.train_classifier(train, method="biased", **FAST)  # hyperparameters travel in the config only


def test_records_without_newer_fields_still_load(digits_copy, tmp_path):
    train = digits_copy.match_tags("train")
    clf = training.train_classifier(train, TrainConfig(**FAST))
    folder = clf.save(str(tmp_path / "clf"))
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        saved = json.load(f)
    newer = ("group_field", "dro_step", "refit_head", "use_generated", "groups", "exclude_field", "stage1_real", "head_epochs", "projection_dim",
             "supcon_weight", "supcon_temperature", "pretrained_weights", "num_workers", "model_selection")
    saved["config"] = {k: v for k, v in saved["config"].items() if k not in newer}
    with open(path, "w") as f:
        json.dump(saved, f)
    loaded = training.load_classifier(folder)
    assert loaded.config == replace(clf.config, **{n: FIELDS[n].default for n in newer})
    paths = train.limit(4).values("filepath")
    assert torch.equal(training.predict(loaded, paths), training.predict(clf, paths))
    # a run's recorded train_config likewise
    old = {k: v for k, v in asdict(clf.config).items() if k not in newer}
    assert TrainConfig.from_dict(old).epochs == FAST["epochs"]
