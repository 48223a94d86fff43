"""Filtering that acts (exclude / weight) and two-stage training (CE + SupCon, then the linear head on real data).

Generated samples are made here from real ones: good copies (the real image
with a little noise) and bad ones (pure noise), so the filter has something
to find. Real MongoDB, real files, no mocks.
"""

import os

import fiftyone as fo
import numpy as np
import pytest
import torch
from PIL import Image

import fairbalance as fb
from fairbalance.core import runs
from fairbalance.train import training
from fairbalance.train.training import load_classifier, supcon_loss
from fairbalance.core.validation import FairBalanceError

NUM_BAD = 10


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def with_generated(tmp_path):
    """Colored Digits (3 classes) + 30 good generated copies + NUM_BAD noise images, all labelled."""
    ds = fb.colored_digits(f"fb-actions-{os.getpid()}", num_classes=3, train_per_class=20, test_per_class=4,
                           conflict_ratio=0.1, image_size=16, persistent=False, overwrite=True,
                           output_dir=str(tmp_path / "digits"))
    rng = np.random.default_rng(0)
    train = ds.match_tags("train")
    samples = []
    rows = list(zip(*train.values(["filepath", "ground_truth.label", "color.label"])))
    for k, (path, gt, col) in enumerate(rows[:30] + rows[:NUM_BAD]):
        bad = k >= 30
        img = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        img = rng.uniform(0, 255, img.shape) if bad else np.clip(img + rng.normal(0, 4, img.shape), 0, 255)
        out = str(tmp_path / f"gen_{k:03d}.png")
        Image.fromarray(img.astype(np.uint8)).save(out)
        samples.append(fo.Sample(filepath=out, tags=["generated"], generated=True, bad=bad,
                                 ground_truth=fo.Classification(label=gt), color=fo.Classification(label=col)))
    ds.add_samples(samples)
    yield ds
    ds.delete()


def _view(ds):
    return ds.match_tags(["train", "generated"])


def test_exclude_leaves_the_low_scoring_samples_out_of_training(with_generated, monkeypatch):
    ds = with_generated
    view = _view(ds)
    res = fb.filter_generated(view, "color", method="pixels", bottom_fraction=0.25, action="exclude")
    bad_ids = set(ds.match({"bad": True}).values("id"))
    marked = set(ds.match({"filtered_out": True}).values("id"))
    assert res.num_excluded == len(marked) == res.num_tagged and res.exclude_field == "filtered_out"
    assert marked == bad_ids  # pixel similarity finds the noise images
    assert ds.count("filtered_out") == 30 + NUM_BAD  # False on every other scored sample
    assert runs.get_run_config(ds, "filter_generated")["action"] == "exclude"

    loaded = []
    real_load = training.load_images

    def spy(paths, *args, **kwargs):  # what training reads from disk: the real function, its inputs recorded
        loaded.append(list(paths))
        return real_load(paths, *args, **kwargs)

    monkeypatch.setattr(training, "load_images", spy)
    clf = fb.train_classifier(view, method="synthetic", epochs=1, run_key="syn")
    bad_files = set(ds.match({"bad": True}).values("filepath"))
    used = loaded[-1]
    num_real = len(ds.match_tags("train"))
    assert len(used) == num_real + 30 and not bad_files & set(used)
    assert clf.num_filtered_out == NUM_BAD and clf.num_generated_used == 30
    assert runs.load_run_results(ds, "syn")["num_filtered_out"] == NUM_BAD
    loaded.clear()
    two = fb.train_classifier(view, method="two_stage", epochs=1, head_epochs=1, run_key="two")
    assert two.num_filtered_out == NUM_BAD and not bad_files & set(loaded[-1])
    assert two.history[0]["num_samples"] == 30  # stage 1: the kept generated samples only
    everything = fb.train_classifier(view, method="synthetic", epochs=1, exclude_field=None, run_key=None)
    assert everything.num_filtered_out == 0 and everything.num_generated_used == 30 + NUM_BAD
    vanilla = fb.train_classifier(view, method="vanilla", epochs=1, run_key=None)  # never uses generated samples
    assert vanilla.num_filtered_out == 0 and vanilla.num_generated_used == 0


def test_weight_action_weights_reach_the_loss(with_generated):
    ds = with_generated
    view = _view(ds)
    res = fb.filter_generated(view, "color", method="pixels", bottom_fraction=0.25, action="weight",
                              run_key="fw")
    assert res.weight_field == "generation_weight" and not ds.has_field("filtered_out")
    gen = ds.match_tags("generated")
    w = dict(zip(*gen.values(["id", "generation_weight"])))
    assert len(w) == 30 + NUM_BAD and all(0 < v <= 1 for v in w.values()) and max(w.values()) == 1.0
    bad = set(ds.match({"bad": True}).values("id"))
    assert max(w[i] for i in bad) < min(w[i] for i in set(w) - bad)  # the noise images weigh least
    data = training.labelled_samples(view, "ground_truth")
    cfg = training.TrainConfig("ground_truth", data.classes, "synthetic", weight_field="generation_weight")
    weights = training._sample_weights(view, data, cfg)
    assert np.allclose(weights, [w.get(i, 1.0) for i in data.ids])  # real samples 1, generated their score
    kwargs = dict(method="synthetic", epochs=3, batch_size=16, seed=0, run_key=None)
    weighted = fb.train_classifier(view, weight_field="generation_weight", **kwargs)
    plain = fb.train_classifier(view, **kwargs)
    assert weighted.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], rel=0.5)
    assert weighted.history[-1]["loss"] != plain.history[-1]["loss"]
    differs = [not torch.equal(a, b) for a, b in zip(weighted.model.state_dict().values(),
                                                      plain.model.state_dict().values())]
    assert any(differs)
    # switching the same run to "tag" drops the weight field it wrote
    fb.filter_generated(view, "color", method="pixels", bottom_fraction=0.25, action="tag", run_key="fw",
                        overwrite=True)
    assert not ds.has_field("generation_weight")


def test_filter_action_bad_input_writes_nothing(with_generated):
    ds = with_generated
    view = _view(ds)
    for kwargs, match in [(dict(action="drop"), "action must be one of"),
                          (dict(method="dino"), "method must be 'clip'"),
                          (dict(method="pixels", texts={"red": "a red digit"}), "compares images only"),
                          (dict(method="pixels", action="weight", weight_field="generation_score"), "must differ")]:
        with pytest.raises(FairBalanceError, match=match):
            fb.filter_generated(view, "color", **kwargs)
    assert not ds.has_run("filter_generated") and not ds.has_field("generation_score")


def test_two_stage_trains_encoder_then_only_the_head(with_generated):
    ds = with_generated
    view = ds.match_tags(["train", "generated"]).match({"bad": {"$ne": True}})
    val = ds.match_tags("test")
    short = fb.train_classifier(view, method="two_stage", epochs=2, head_epochs=1, batch_size=16, seed=3,
                                run_key=None)
    long = fb.train_classifier(view, method="two_stage", epochs=2, head_epochs=4, batch_size=16, seed=3,
                               run_key="ts")
    stages = [h["stage"] for h in long.history]
    assert stages == [1, 1, 2, 2, 2, 2]
    assert all("supcon_loss" in h and h["supcon_loss"] > 0 for h in long.history[:2])
    assert [h["num_samples"] for h in long.history] == [30] * 2 + [len(ds.match_tags("train"))] * 4
    assert long.best_epoch == 6  # no validation view: the last epoch
    selected = fb.train_classifier(view, method="two_stage", epochs=1, head_epochs=3, val_samples=val, run_key=None)
    assert selected.config.model_selection == "best_val_accuracy" and selected.best_epoch in (2, 3, 4)
    assert "val_accuracy" in selected.history[0] and all("val_accuracy" in h for h in selected.history)
    enc_s, head_s = training.split_encoder_head(short.model)
    enc_l, head_l = training.split_encoder_head(long.model)
    # stage 1 is the same in both; stage 2 leaves the encoder untouched and moves only the head
    assert all(torch.equal(a, b) for a, b in zip(enc_s.state_dict().values(), enc_l.state_dict().values()))
    assert not torch.equal(head_s.weight, head_l.weight)
    both = fb.train_classifier(view, method="two_stage", epochs=1, head_epochs=1, stage1_real=True, run_key=None)
    assert both.history[0]["num_samples"] == len(view)
    # predictions and evaluation like every method
    fb.apply_classifier(val, classifier_run="ts", predictions_field="ts_pred")
    ev = fb.evaluate_classifier(val, "ts_pred", aligned_field="bias_aligned")
    assert 0 <= ev.accuracy <= 1 and ev.num_samples == len(val)
    again = load_classifier(runs.get_run_config(ds, "ts")["checkpoint"])
    x = training.load_images(val.values("filepath"), again.config.image_size)
    assert torch.equal(again.model(x).argmax(1), long.model(x).argmax(1))
    cfg = runs.get_run_config(ds, "ts")
    assert cfg["training_method"] == "two_stage" and cfg["supcon_temperature"] == 0.1 and cfg["head_epochs"] == 4


def test_supcon_loss():
    y = torch.tensor([0, 0, 1, 1, 2])
    aligned = torch.tensor([[1.0, 0], [1.0, 0.01], [0, 1.0], [0.01, 1.0], [-1.0, 0]])
    crossed = aligned[[0, 2, 1, 3, 4]]
    good, bad = supcon_loss(aligned, y, 0.1), supcon_loss(crossed, y, 0.1)
    assert good[:4].mean() < bad[:4].mean()
    assert good[4] == 0 and bad[4] == 0  # an anchor without a positive
    assert torch.isfinite(good).all()


def test_two_stage_bad_input_is_refused_before_training(with_generated):
    ds = with_generated
    view = _view(ds)
    for kwargs, match in [(dict(supcon_temperature=0.0), "supcon_temperature"),
                          (dict(supcon_weight=-1.0), "supcon_weight"),
                          (dict(head_epochs=0), "head_epochs"),
                          (dict(projection_dim=0), "projection_dim"),
                          (dict(stage1_real="yes"), "stage1_real"),
                          (dict(exclude_field="a.b"), "Invalid field name")]:
        with pytest.raises(FairBalanceError, match=match):
            fb.train_classifier(view, method="two_stage", epochs=1, run_key="bad", **kwargs)
    with pytest.raises(FairBalanceError, match="method='two_stage' needs generated samples"):
        fb.train_classifier(ds.match_tags("train"), method="two_stage", epochs=1, run_key="bad")
    assert not ds.has_run("bad")


def test_operators_filter_action_and_two_stage(with_generated):
    import fiftyone.operators as foo

    ds = with_generated
    res = foo.execute_operator("@fairbalance/fairbalance/filter_generated", ctx={
        "dataset": ds.name, "params": {"label_field": "color", "method": "pixels", "action": "exclude",
                                       "bottom_fraction": 0.25}})
    assert res.error is None, res.error
    assert res.result["num_excluded"] == NUM_BAD
    assert set(ds.match({"filtered_out": True}).values("id")) == set(ds.match({"bad": True}).values("id"))
    res = foo.execute_operator("@fairbalance/fairbalance/train_classifier", ctx={
        "dataset": ds.name, "params": {"label_field": "ground_truth", "method": "two_stage", "epochs": 1,
                                       "head_epochs": 2, "run_key": "op_ts"}})
    assert res.error is None, res.error
    results = runs.load_run_results(ds, "op_ts")
    assert results["num_filtered_out"] == NUM_BAD and [h["stage"] for h in results["history"]] == [1, 2, 2]
