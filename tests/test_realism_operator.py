"""The ``measure_realism`` App operator: the same run as the SDK, its form's choices and refusals before Execute.

Real Colored Digits on the real MongoDB; the "generated" images are real
files written here: real training digits with a bright haze (what issue #28
found: generated images 1.8x as bright), so the answer is known (separable,
too bright). The operator runs through FiftyOne's own executor and form
resolution; no mocks.
"""

import asyncio
import json
import os

import fiftyone as fo
import fiftyone.operators as foo
from fiftyone import ViewField as F
import numpy as np
import pytest
from fiftyone.operators.executor import ExecutionError, resolve_type
from fiftyone.operators.registry import OperatorRegistry
from PIL import Image

import fairbalance as fb
from fairbalance.core import runs
from test_app_server import PLUGIN

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

FAST = {"folds": 2, "epochs": 3, "tstr_epochs": 3, "seed": 3}


def add_hazy_copies(ds, rows, out_dir):
    """Adds a hazy copy (1.3x + 30 levels) of each (filepath, class, colour) row, marked and tagged generated, and
    cuts the test split into a "reference" and a "heldout" half: the known answer is separable and too bright."""
    samples = []
    for k, (path, gt, col) in enumerate(rows):
        img = np.asarray(Image.open(path).convert("RGB"), dtype=float)
        out = os.path.join(str(out_dir), f"haze_{k:03d}.png")
        Image.fromarray(np.clip(img * 1.3 + 30, 0, 255).astype(np.uint8)).save(out)
        samples.append(fo.Sample(filepath=out, tags=["generated"], generated=True,
                                 ground_truth=fo.Classification(label=gt), color=fo.Classification(label=col)))
    ds.add_samples(samples)
    ids = ds.match_tags("test").values("id")
    ds.select(ids[::2]).tag_samples("reference")
    ds.select(ids[1::2]).tag_samples("heldout")


@pytest.fixture(scope="module")
def hazy(tmp_path_factory):
    """Colored Digits (16 px): train (real), 60 hazy copies of training digits (generated, with class and colour),
    the unbiased test split cut into a reference and a held-out TSTR split, a saved view of the real train split."""
    tmp = tmp_path_factory.mktemp("realism_op")
    ds = fb.colored_digits(f"fb-realism-op-{os.getpid()}", num_classes=4, train_per_class=30, test_per_class=20,
                           conflict_ratio=0.1, image_size=16, persistent=False, overwrite=True,
                           output_dir=str(tmp / "digits"))
    rows = list(zip(*ds.match_tags("train").values(["filepath", "ground_truth.label", "color.label"])))
    add_hazy_copies(ds, [rows[j] for j in np.random.default_rng(0).permutation(len(rows))[:60]], tmp)
    ds.save_view("real_train", ds.match_tags("train"))
    ds.save_view("nothing", ds.limit(0))
    yield ds
    ds.delete()


def _execute(ds, view, params):
    res = foo.execute_operator(f"{PLUGIN}/measure_realism", ctx={
        "dataset": ds.name, "view": view, "params": {"view_target": "CURRENT_VIEW", **params}})
    assert res.error is None, res.error
    return res.result


def _same_run(ds, app_key, sdk_key):
    """The two recorded runs hold the same results and the same config, but for their keys."""
    app, sdk = (runs.load_run_results(ds, k) for k in (app_key, sdk_key))
    assert app == sdk and app["two_sample_accuracy"] is not None
    cfg = [{k: v for k, v in runs.get_run_config(ds, key).items() if k not in ("run_key", "started_at",
                                                                              "completed_at")}
           for key in (app_key, sdk_key)]
    assert cfg[0] == cfg[1]
    return app


def test_operator_and_sdk_record_the_same_run(hazy):
    """The view's own split, a TSTR split and a cell-matched reference: the App's run is the SDK's, to the bit."""
    ds = hazy
    view = ds.match_tags(["train", "generated"])
    out = _execute(ds, view, {"label_field": "ground_truth", "attribute_field": "color", "test_split": "heldout",
                              "reference": "reference", "match_cells": True, "run_key": "real_app", **FAST})
    sdk = fb.measure_realism(view, None, "ground_truth", attribute_field="color",
                             test_samples=ds.match_tags("heldout"), reference_samples=ds.match_tags("reference"),
                             match_cells=True, run_key="real_sdk", **FAST)
    stored = _same_run(ds, "real_app", "real_sdk")
    assert stored["two_sample_accuracy"] == sdk.two_sample_accuracy >= 0.9  # the haze gives them away
    assert stored["reference_two_sample_accuracy"] == sdk.reference_two_sample_accuracy is not None
    assert sdk.num_generated == 60 and sdk.num_real == 120 and sdk.num_tstr_test == 40
    cfg = runs.get_run_config(ds, "real_app")
    assert cfg["match_cells"] is True and cfg["folds"] == 2 and cfg["seed"] == 3 and cfg["test_view"]
    # the result dialog: the figures rounded, the readings in words
    assert out["two_sample_accuracy"] == round(sdk.two_sample_accuracy, 3)
    assert out["intensity_ratio"] == round(sdk.intensity_ratio, 3) and sdk.intensity_ratio > 1.2
    assert out["tstr"].startswith(f"{sdk.tstr_accuracy:.1%} (trained on {sdk.num_tstr_train} generated")
    assert out["trtr"].startswith(f"{sdk.trtr_accuracy:.1%}")
    assert out["reference_cells"] == (f"{sdk.reference_cells_matched} of {sdk.reference_cells_total} generated "
                                      "cells have reference images")
    assert "bright" in out["warnings_text"] and out["warnings_text"] == "\n".join(f"- {w}" for w in sdk.warnings)
    assert f"{sdk.two_sample_accuracy:.1%}" in out["reading"]
    assert len(out["cell_table"]) == len(sdk.cell_statistics) and out["cell_table"][0]["ratio"] > 1.2


def test_named_sets_and_the_cnn_match_the_sdk(hazy):
    """Generated samples by tag, real ones by saved view, the CNN discriminator, no label field (no TSTR)."""
    ds = hazy
    _execute(ds, ds.view(), {"generated": "generated", "real": "real_train", "label_field": None,
                             "discriminator": "cnn", "max_samples": 50, "run_key": "named_app", **FAST})
    sdk = fb.measure_realism(ds.load_saved_view("real_train"), ds.match_tags("generated"), None,
                             discriminator="cnn", max_samples=50, run_key="named_sdk", **FAST)
    stored = _same_run(ds, "named_app", "named_sdk")
    assert stored["discriminator"] == "cnn" and stored["tstr_accuracy"] is None
    assert sdk.num_real == sdk.num_generated == 50
    # one set named, the other the view's: the real side is the view's samples that are not generated
    _execute(ds, ds.match_tags(["train", "generated"]), {"generated": "generated", "label_field": "ground_truth",
                                                         "run_key": "half_app", **FAST})
    fb.measure_realism(ds.match_tags(["train", "generated"]).match(F("generated") != True),  # noqa: E712
                       ds.match_tags("generated"), run_key="half_sdk", **FAST)
    _same_run(ds, "half_app", "half_sdk")


def _form(ds, view=None, **params):
    request = {"dataset_name": ds.name, "target": "inputs",
               "params": {**({"view_target": "CURRENT_VIEW"} if view is not None else {}), **params},
               **({"view": view._serialize()} if view is not None else {})}
    return asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN}/measure_realism", request)).type.properties


def _problems(props):
    return {k: p.error_message for k, p in props.items() if p.invalid}


def test_form_offers_the_datasets_own_choices_and_says_what_it_compares(hazy):
    ds = hazy
    props = _form(ds, ds.match_tags(["train", "generated"]))
    assert _problems(props) == {}
    offered = list(props["generated"].type.values)
    assert offered[0] == "__view_generated__" and {"generated", "train", "reference", "real_train"} <= set(offered)
    assert list(props["real"].type.values)[0] == "__view_rest__" and "real_train" in props["real"].type.values
    assert {"ground_truth", "color"} <= set(props["label_field"].type.values)
    assert props["label_field"].default == "ground_truth" and "match_cells" not in props
    assert "60 generated and 120 real images will be compared" in props["plan"].view.label
    with_ref = _form(ds, ds.match_tags(["train", "generated"]), attribute_field="color", reference="reference",
                     match_cells=True)
    assert "match_cells" in with_ref and _problems(with_ref) == {}
    assert "against" in with_ref["plan"].view.label and "generated cells the reference has" in \
        with_ref["plan"].view.label


def test_form_refuses_what_the_library_would_before_any_run(hazy):
    ds = hazy
    view = ds.match_tags(["train", "generated"])
    cases = [
        (ds.match_tags("train"), {}, "no sample with generated == True"),  # the view's split finds none
        (view, {"generated": "nothing"}, "No generated samples to compare"),  # an empty saved view
        (view, {"reference": "train"}, "shares 120 image"),  # the reference is the real side
        (view, {"reference": "reference", "match_cells": True}, "label_field and an attribute_field"),
        (view, {"real": "generated"}, "share images"),
        (view, {"folds": 1}, None),  # the form's own minimum
    ]
    for v, params, message in cases:
        problems = _problems(_form(ds, v, **params))
        assert problems, params
        if message:
            assert message in problems["refused"], (params, problems)
            assert "Traceback" not in problems["refused"]
    # Execute checks the form too: nothing is recorded
    for v, params in [(ds.match_tags("train"), {}), (view, {"label_field": "no_such_field"}),
                      (view, {"reference": "reference", "match_cells": True})]:
        with pytest.raises(ExecutionError):
            foo.execute_operator(f"{PLUGIN}/measure_realism", ctx={
                "dataset": ds.name, "view": v, "params": {"view_target": "CURRENT_VIEW", "run_key": "refused",
                                                          **params}})
    assert not ds.has_run("refused")
    # a run key in use needs Overwrite, as everywhere
    fb.measure_realism(view, run_key="taken", **FAST)
    taken = _problems(_form(ds, view, run_key="taken"))
    assert "already exists" in taken["run_key"]
    assert "run_key" not in _problems(_form(ds, view, run_key="taken", overwrite=True))


def test_an_immediate_run_streams_its_folds(hazy, monkeypatch):
    from test_progress_stream import STEPS, _run, _triggered

    lines = _run("measure_realism", {"label_field": "ground_truth", "run_key": "streamed", **FAST}, hazy.name,
                 progress_after=0, monkeypatch=monkeypatch)
    progress = _triggered(lines, "set_progress")
    assert progress and all(STEPS.match(p["label"]) for p in progress), progress
    assert progress[-1]["label"].startswith("Discriminator folds and classifiers: 4 of 4 (100%)")  # 2 folds + 2
    shown = _triggered(lines, "show_output")[0]
    assert shown["outputs"]["view"]["label"] == "Realism measured"
    assert shown["results"]["two_sample_accuracy"] == round(
        runs.load_run_results(hazy, "streamed")["two_sample_accuracy"], 3)


def test_check_realism_gives_the_sdks_refusals_and_writes_nothing(hazy):
    """The form's check is the library's: the same refusal as ``measure_realism`` for the same arguments."""
    from fairbalance.core.validation import FairBalanceError
    from fairbalance.generate.realism import check_realism

    ds = hazy
    view = ds.match_tags(["train", "generated"])
    assert check_realism(view, **FAST) == {"num_real": 120, "num_generated": 60}
    ref = check_realism(view, attribute_field="color", reference_samples=ds.match_tags("reference"),
                        match_cells=True, **FAST)
    assert ref["reference_cells_matched"] <= ref["reference_cells_total"] and ref["reference_num_real"] > 0
    for args, kwargs, match in [
            ((ds.match_tags("train"),), {}, "no sample with generated == True"),
            ((ds.match_tags("generated"),), {}, "only generated samples"),
            ((view,), {"label_field": "nope"}, "not found"),
            ((view,), {"reference_samples": ds.match_tags("train")}, "shares 120 image"),
            ((view,), {"max_samples": 3}, "max_samples"),
            ((view, ds.load_saved_view("nothing")), {}, "No generated samples")]:
        for fn in (check_realism, fb.measure_realism):
            with pytest.raises(FairBalanceError, match=match):
                fn(*args, **{**FAST, **kwargs, **({"run_key": "chk"} if fn is fb.measure_realism else {})})
    assert not ds.has_run("chk")


def test_the_command_line_run_is_the_sdks_and_refuses_like_it(hazy, capsys):
    """``fairbalance measure-realism``: the sets as saved views / tags, the same run as the SDK's; a refusal is
    the SDK's words with exit code 2 and nothing recorded."""
    from fairbalance.ops import cli

    ds = hazy
    ds.save_view("train_and_generated", ds.match_tags(["train", "generated"]))
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    assert cli.main(["measure-realism", ds.name, "--view", "train_and_generated", "--attribute-field", "color",
                     "--test-view", "heldout", "--reference-view", "reference", "--match-cells",
                     "--run-key", "real_cli", "--json", *flags]) == 0
    printed = json.loads(capsys.readouterr().out)
    sdk = fb.measure_realism(ds.load_saved_view("train_and_generated"), None, "ground_truth", attribute_field="color",
                             test_samples=ds.match_tags("heldout"), reference_samples=ds.match_tags("reference"),
                             match_cells=True, run_key="real_cli_sdk", **FAST)
    _same_run(ds, "real_cli", "real_cli_sdk")
    assert printed["two_sample_accuracy"] == sdk.two_sample_accuracy >= 0.9
    assert printed["reference_two_sample_accuracy"] == sdk.reference_two_sample_accuracy
    # the generated set named: a tag, the real side the view
    assert cli.main(["measure-realism", ds.name, "--view", "real_train", "--generated-view", "generated",
                     "--run-key", "named_cli", *flags]) == 0
    assert "two_sample_accuracy:" in capsys.readouterr().out
    assert runs.get_run_config(ds, "named_cli")["generated_view"]
    # refused before any run: the reference shares images with the real set; an unknown view name
    assert cli.main(["measure-realism", ds.name, "--view", "train_and_generated", "--reference-view", "train",
                     "--run-key", "refused_cli", *flags]) == 2
    assert "shares 120 image" in capsys.readouterr().err
    assert cli.main(["measure-realism", ds.name, "--view", "train_and_generated", "--test-view", "nope",
                     "--run-key", "refused_cli", *flags]) == 2
    assert not ds.has_run("refused_cli")
