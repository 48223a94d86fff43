"""The writer contract, checked by calling every public writer (issue #23 item 5).

The writers are derived from the public API (every function of
``fairbalance.__all__`` that takes ``overwrite``: it writes a run, a field,
a folder or a dataset), so a new writer without a recipe here fails
:func:`test_every_public_writer_has_a_recipe`. Each is called on a tiny
Colored Digits dataset (real MongoDB, real PNGs) with the tiny models of
``tests/tiny_models.py``:

- its result: a fairbalance class (not a dict/str/None), ``run_key``, a JSON
  ``to_dict()``, the run recorded on the dataset, and a second writer on the
  same run key refused;
- a taken run key (recorded by another writer, or held by a running
  operation) is refused *before* any model is loaded or any folder or
  dataset is created: the model paths given do not exist and the output
  folder not yet, so loading or creating first would show.
"""

from __future__ import annotations

import datetime as dt
import glob
import inspect
import json
import os
import socket

import numpy as np
import pytest

import fairbalance as fb
import tiny_models
from fairbalance.core.validation import FairBalanceError

TINY = dict(image_size=16, block_out_channels=(16, 32), batch_size=32)
TEXTS = ["a red digit", "a green digit", "a yellow digit"]
MISSING = "/nonexistent/fairbalance-model"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def public_writers() -> dict:
    """Every public function that writes (takes ``overwrite``), from ``fairbalance.__all__``: function -> its
    public names (an old name kept as an alias is the same function)."""
    out: dict = {}
    for name in fb.__all__:
        obj = getattr(fb, name)
        if callable(obj) and not inspect.isclass(obj) and "overwrite" in inspect.signature(obj).parameters:
            out.setdefault(obj, []).append(name)
    return out


class Ctx:
    """The models and folders a recipe uses; with ``missing``, every model path is one that does not exist."""

    def __init__(self, world, out, missing=False):
        self.w, self.out, self.missing = world, str(out), missing

    def __getattr__(self, name):  # diff, clf, clip, blip, sd, adapters
        value = self.w[name]
        if not self.missing:
            return value
        return f"local-dir:{MISSING}-{name}" if name == "clip" else f"{MISSING}-{name}"


# name -> call(ctx, view, run_key): every public writer, called as a user would, on tiny models.
RECIPES = {
    "apply_classifier": lambda c, v, k: fb.apply_classifier(v, c.clf, predictions_field=k, run_key=k),
    "audit_balance": lambda c, v, k: fb.audit_balance(
        v, related_texts_override=TEXTS, model=c.clip, pretrained=None, kmax=3, features_field=f"{k}_sa",
        label_field=f"{k}_cluster", run_key=k),
    "balance_report": lambda c, v, k: fb.balance_report(v, "ground_truth", attribute_field="color", run_key=k),
    "compute_captions": lambda c, v, k: fb.compute_captions(
        v.limit(3), model=c.blip, num_captions=1, max_new_tokens=4, batch_size=4, caption_field=k, device="cpu",
        run_key=k),
    "compute_hardness_tags": lambda c, v, k: fb.compute_hardness_tags(
        v, "ground_truth", loss_field=f"{k}_loss", tag=k, epochs=1, batch_size=64, output_dir=c.out, run_key=k),
    "compute_pseudo_labels": lambda c, v, k: fb.compute_pseudo_labels(
        v, features_field="feats", label_field=k, method="kmeans", num_clusters=2, run_key=k),
    "compute_sa_features": lambda c, v, k: fb.compute_sa_features(
        v, related_texts_override=TEXTS, model=c.clip, pretrained=None, embeddings_field=f"{k}_emb",
        features_field=k, device="cpu", run_key=k),
    "discover_slices": lambda c, v, k: fb.discover_slices(
        v.match_tags("train"), "ground_truth", classifier=c.clf, slices_per_class=2, slice_field=k,
        name_with_clip=False, run_key=k),
    "evaluate_classifier": lambda c, v, k: fb.evaluate_classifier(
        v, "w_preds", "ground_truth", attribute_field="color", run_key=k),
    "filter_captions": lambda c, v, k: fb.filter_captions(v, caption_field="caps", output_field=k, top_f=2,
                                                          run_key=k),
    "filter_generated": lambda c, v, k: fb.filter_generated(v, "color", method="pixels", tag=k, run_key=k),
    "finetune_per_group": lambda c, v, k, **kw: fb.finetune_per_group(
        v.match_tags("train"), group_field="color", base_model=c.diff, rank=2, steps=2, min_images=1,
        output_dir=c.out, run_key=k, **kw),
    "generate_balanced": lambda c, v, k, **kw: fb.generate_balanced(
        v.match_tags("train"), "color", model=c.diff, per_class=1, num_inference_steps=2, realism_sample=0,
        output_dir=c.out, run_key=k, **kw),
    "generate_from_captions": lambda c, v, k, **kw: fb.generate_from_captions(
        v.limit(2), caption_field="caps", model=c.sd, num_inference_steps=2, height=16, width=16,
        safety_checker=False, device="cpu", output_dir=c.out, run_key=k, **kw),
    "generate_per_group": lambda c, v, k, **kw: fb.generate_per_group(
        v.match_tags("train"), adapters=c.adapters, per_group=1, num_inference_steps=2, output_dir=c.out,
        run_key=k, **kw),
    "inject_bias_conflicting": lambda c, v, k, **kw: fb.inject_bias_conflicting(
        v.match_tags("train"), model=c.diff, content_tag="bias_conflicting", label_field="ground_truth",
        ratio=0.2, t_edit=500, t_boost=200, num_inference_steps=4, output_dir=c.out, run_key=k, **kw),
    "measure_realism": lambda c, v, k: fb.measure_realism(
        v.match_tags("train").match({"generated": {"$ne": True}}), v.match_tags("generated"),
        label_field="ground_truth", folds=2, epochs=1, tstr_epochs=1, run_key=k),
    "queue_sharded": lambda c, v, k: fb.queue_sharded(
        v, "compute_sa_features", 2, run_key=k, related_texts_override=TEXTS, model=c.clip, pretrained=None,
        embeddings_field=f"{k}_emb", features_field=k),
    "train_classifier": lambda c, v, k: fb.train_classifier(v, "ground_truth", epochs=1, batch_size=64,
                                                            output_dir=c.out, run_key=k),
    "train_conditional_diffusion": lambda c, v, k, **kw: fb.train_conditional_diffusion(
        v.match_tags("train"), "color", epochs=1, output_dir=c.out, run_key=k, **TINY, **kw),
}
# writers without a run key: their "key" is the dataset name (dataset builders) or the output folder (export)
DATASET_BUILDERS = {
    "colored_digits": lambda c, name: fb.colored_digits(name, output_dir=c.out, num_classes=3, train_per_class=4,
                                                        test_per_class=1, image_size=16, persistent=False),
    "colored_mnist": lambda c, name: fb.colored_mnist(name, output_dir=c.out, num_val=10, num_test=10),
    "corrupted_mnist": lambda c, name: fb.corrupted_mnist(name, output_dir=c.out, num_val=10, num_test=10),
}
FOLDER_WRITERS = {
    "export_samples": lambda c, v: fb.export_samples(v, c.out, label_field="color"),
}
# resumable writers: a rerun with the same settings resumes; one other number they record, for the refusal test
OTHER_SETTING = {"finetune_per_group": {"lr": 0.5}, "generate_balanced": {"guidance_scale": 1.0},
                 "generate_from_captions": {"guidance_scale": 1.0}, "generate_per_group": {"guidance_scale": 1.0},
                 "inject_bias_conflicting": {"gamma": 0.5}, "train_conditional_diffusion": {"lr": 0.5}}
SLOW = {"colored_mnist", "corrupted_mnist"}  # build 5,000 real MNIST digits


@pytest.fixture(scope="module")
def world(tiny_clip, tmp_path_factory):
    """A tiny dataset holding what every writer reads (features, captions, predictions, generated samples,
    tagged bias-conflicting samples) and the tiny models they load (CLIP, BLIP, Stable Diffusion, a conditional
    diffusion model, a classifier, per-group adapters)."""
    root = tmp_path_factory.mktemp("writers")
    ds = fb.colored_digits("fb-writers", num_classes=3, train_per_class=8, test_per_class=2, conflict_ratio=0.25,
                           image_size=16, persistent=False, overwrite=True, output_dir=str(root / "images"))
    rng = np.random.default_rng(0)
    n = len(ds)
    ds.set_values("feats", [rng.normal(size=4).astype(np.float32) for _ in range(n)])
    words = ["red digit", "green digit", "yellow digit"]
    ds.set_values("caps", [[f"a {words[i % 3]}", f"the {words[(i + 1) % 3]} zero"] for i in range(n)])
    ds.match({"bias_aligned": False}).tag_samples("bias_conflicting")
    train = ds.match_tags("train")
    diff = fb.train_conditional_diffusion(train, "color", epochs=1, output_dir=str(root / "diff"), run_key="w_diff",
                                          **TINY).model_dir
    clf = fb.train_classifier(ds, "ground_truth", epochs=1, output_dir=str(root / "clf"), run_key="w_clf").checkpoint
    fb.apply_classifier(ds, clf, "w_preds")
    fb.generate_balanced(train, "color", model=diff, per_class=2, num_inference_steps=2, realism_sample=0,
                         output_dir=str(root / "gen"), run_key="w_gen")
    adapters = fb.finetune_per_group(train, group_field="color", base_model=diff, rank=2, steps=2,
                                     output_dir=str(root / "adapters"), run_key="w_ft").output_dir
    world = {"ds": ds, "diff": diff, "clf": clf, "clip": tiny_clip, "adapters": adapters,
             "blip": tiny_models.build_blip(str(root / "blip")),
             "sd": tiny_models.build_stable_diffusion(str(root / "sd"))}
    yield world
    ds.delete()


@pytest.fixture
def view(world):
    """A writable copy of the world's dataset (its runs included)."""
    clone = world["ds"].clone()
    yield clone
    clone.delete()


def _runs_of(name, key):
    """The run keys a writer records (audit_balance records its three steps)."""
    return [key, f"{key}_sa_features", f"{key}_pseudo_labels"] if name == "audit_balance" else [key]


def _second_writer(view, key):
    """Another writer on the same run key (never the writer under test: the report's method differs)."""
    return fb.balance_report(view, "color", run_key=key)


def test_every_public_writer_has_a_recipe():
    """A new public writer fails here until the contract tests call it."""
    writers = public_writers()
    names = {n for ns in writers.values() for n in ns}
    assert {"generate_balanced", "train_classifier", "export_samples", "colored_digits"} <= names
    covered = set(RECIPES) | set(DATASET_BUILDERS) | set(FOLDER_WRITERS)
    assert covered <= names
    missing = [ns for ns in writers.values() if not covered & set(ns)]
    assert not missing, f"public writers without a recipe in tests/test_writers.py: {missing}"
    for name in RECIPES:  # every run writer takes a run key, checked up front by the one shared check
        assert "run_key" in inspect.signature(getattr(fb, name)).parameters, name
        assert hasattr(getattr(fb, name), "run_method"), f"{name} is not decorated with runs.writer"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_writer_returns_its_run_and_refuses_a_second_writer(world, view, tmp_path, name):
    key = f"c_{name}"
    result = RECIPES[name](Ctx(world, tmp_path / "out"), view, key)
    assert type(result).__module__.startswith("fairbalance."), type(result)
    assert result.run_key == key
    as_dict = result.to_dict()
    assert isinstance(as_dict, dict) and json.loads(json.dumps(as_dict))  # plain JSON: no numpy, no objects
    view.reload()
    if name == "queue_sharded":  # recorded when the last shard merges; the job is recorded now
        assert fb.sharded_status(view, key)["num_shards"] == 2
    else:
        assert set(_runs_of(name, key)) <= set(view.list_runs())
        assert view.get_run_info(key).config.method.startswith("fairbalance.")
    other = (lambda: fb.compute_pseudo_labels(view, "feats", label_field="x_other", run_key=key)) \
        if name == "balance_report" else (lambda: _second_writer(view, key))
    with pytest.raises(FairBalanceError, match=f"Run '{key}'"):
        other()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(DATASET_BUILDERS)])
def test_dataset_builders_return_the_dataset_and_refuse_its_name(tmp_path, name):
    import fiftyone as fo

    ds_name = f"fb-writers-{name}"
    try:
        ds = DATASET_BUILDERS[name](Ctx({}, tmp_path / "a"), ds_name)
        assert isinstance(ds, fo.Dataset) and ds.name == ds_name and len(ds) > 0
        with pytest.raises(FairBalanceError, match="already exists"):
            DATASET_BUILDERS[name](Ctx({}, tmp_path / "b"), ds_name)
        assert not os.path.exists(tmp_path / "b")  # refused before its folder was made
    finally:
        if fo.dataset_exists(ds_name):
            fo.delete_dataset(ds_name)


def test_export_returns_its_result_and_refuses_a_held_folder(world, view, tmp_path):
    res = FOLDER_WRITERS["export_samples"](Ctx(world, tmp_path / "out"), view)
    assert type(res).__module__.startswith("fairbalance.") and res.num_samples > 0
    assert json.loads(json.dumps(res.to_dict()))
    out = tmp_path / "held"
    with _held(f"dir:{os.path.realpath(out)}"):
        with pytest.raises(fb.ClaimError):
            FOLDER_WRITERS["export_samples"](Ctx(world, out), view)
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------- a taken run key, refused first


class _held:
    """A claim held by another live process on this host (this process's parent), as a running writer holds it."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        from fairbalance.core import claims

        now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
        claims._collection().insert_one({"_id": self.name, "token": "another", "pid": os.getppid(),
                                         "host": socket.gethostname(), "what": "a test's writer", "started": now,
                                         "heartbeat": now})

    def __exit__(self, *exc):
        from fairbalance.core import claims

        claims._collection().delete_many({"_id": self.name})


def _state(ds, out):
    import fiftyone as fo

    ds.reload()
    return (ds.count("id"), sorted(ds.get_field_schema()), sorted(ds.list_runs()), sorted(fo.list_datasets()),
            os.path.exists(out))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("taken", ["recorded", "running"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_taken_run_key_is_refused_before_any_model_folder_or_dataset(world, view, tmp_path, name, taken):
    """The run key is another writer's (a recorded run of another kind, or held by a running operation): the
    error names the run key, though the model paths given do not exist and the output folder is new."""
    from fairbalance.core import claims

    key = "taken"
    out = tmp_path / "out"
    if taken == "recorded":
        fb.balance_report(view, "ground_truth", run_key=key)  # for balance_report itself: refused without overwrite
    before = _state(view, out)
    ctx = Ctx(world, out, missing=True)
    if taken == "running":
        with _held(f"run:{view._doc.id}:{key}"):
            with pytest.raises(claims.ClaimError, match=f"Run '{key}'"):
                RECIPES[name](ctx, view, key)
    else:
        with pytest.raises(FairBalanceError, match=f"Run '{key}' (was made by|already exists)"):
            RECIPES[name](ctx, view, key)
    assert _state(view, out) == before  # no sample, field, run, dataset or folder
    assert not glob.glob(str(tmp_path / "**" / "*.png"), recursive=True)
    assert not claims.list_claims()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(OTHER_SETTING))
def test_a_resumable_run_given_other_settings_is_refused_before_any_model_or_folder(world, view, tmp_path, name):
    """A rerun resumes; the same run key with another recorded setting is refused before the model is loaded
    (the model paths given now do not exist) and before the new output folder is made."""
    key = f"r_{name}"
    RECIPES[name](Ctx(world, tmp_path / "first"), view, key)
    out = tmp_path / "out"
    before = _state(view, out)
    (setting, value), = OTHER_SETTING[name].items()
    with pytest.raises(FairBalanceError, match=f"Run '{key}' already exists .*differs in: {setting}"):
        RECIPES[name](Ctx(world, out, missing=True), view, key, **OTHER_SETTING[name])
    assert _state(view, out) == before
