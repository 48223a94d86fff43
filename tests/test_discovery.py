"""Slice discovery on real MNIST digits and the real MongoDB: a planted slice is found, named and recorded."""

import os

import numpy as np
import pytest

import fiftyone as fo

import fairbalance as fb
from fairbalance.datasets import colored_mnist
from fairbalance.core import runs
from fairbalance.tag import discovery

COLORS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.1, 0.1, 1.0)}
PER_CLASS, PLANTED = 120, 16


@pytest.fixture(scope="module")
def planted_files(tmp_path_factory):
    """Digits 0, 1, 2 (real MNIST), each in its class colour; in class 0, PLANTED digits are blue (the slice)."""
    images, labels = colored_mnist.load_mnist_5k()
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    rows = []
    for c, color in enumerate(COLORS):
        src = np.flatnonzero(labels == c)[:PER_CLASS]
        planted = set(rng.choice(len(src), PLANTED, replace=False).tolist()) if c == 0 else set()
        for j, s in enumerate(src):
            stroke = "blue" if j in planted else color
            path = os.path.join(root, f"{c}_{j:03d}.png")
            colored_mnist.render(images[s], np.array(COLORS[stroke])).save(path)
            rows.append((path, str(c), stroke, j in planted, ["A", "B"][int(rng.integers(2))]))
    return rows


@pytest.fixture
def planted(make_dataset, planted_files):
    ds = make_dataset()
    ds.add_samples([fo.Sample(filepath=p, ground_truth=fo.Classification(label=y), stroke=s, batch=b)
                    for p, y, s, _, b in planted_files])
    return ds


def _truth(ds, planted_files):
    """id -> in the planted slice (kept off the dataset: no method may read it)."""
    by_path = {p: t for p, _, _, t, _ in planted_files}
    return {i: by_path[p] for i, p in zip(*ds.values(["id", "filepath"]))}


def _precision_at(scores: dict, truth: dict, k: int) -> float:
    top = sorted(scores, key=lambda i: -scores[i])[:k]
    return sum(truth[i] for i in top) / k


@pytest.mark.timeout(300)
def test_planted_slice_is_found_named_and_recorded(planted, planted_files, one_thread):
    res = fb.discover_slices(planted, "ground_truth", epochs=4, slices_per_class=4, seed=0)
    ids, slices, scores = planted.values(["id", "slice", "slice_score"])
    truth = _truth(planted, planted_files)
    # the best predicted slice: ranked by membership, precision@10 >= 0.8 (DCBench's measure)
    best = max(set(slices), key=lambda s: _precision_at(
        {i: sc for i, sl, sc in zip(ids, slices, scores) if sl == s}, truth, 10))
    members = {i: sc for i, sl, sc in zip(ids, slices, scores) if sl == best}
    assert _precision_at(members, truth, 10) >= 0.8
    assert best.startswith("0/")
    record = next(r for r in res.slices if r["slice"] == best)
    # its record: size, class, the biased model's error rate and its gap to the class, and a name that says why
    assert record["class"] == "0" and record["size"] == len(members)
    assert record["error_rate"] > record["class_error_rate"] and record["error_gap"] > 0
    assert record["name"] == "stroke = blue"
    assert record["names"][0]["count"] >= 8 and record["names"][0]["lift"] > 1
    assert res.clip_naming.startswith("skipped")  # no CLIP embeddings: said, not silently left out
    assert res.slices[0]["error_gap"] >= res.slices[-1]["error_gap"]  # ranked by the gap
    # recorded as a run with its config; slices usable as an attribute field (a plain string field)
    cfg = runs.get_run_config(planted, "slices")
    assert cfg["method"] == "fairbalance.discover_slices" and cfg["slices_per_class"] == 4
    assert cfg["fields_written"] == ["slice", "slice_score"]
    stored = runs.load_run_results(planted, "slices")
    assert [r["slice"] for r in stored["slices"]] == [r["slice"] for r in res.slices]
    assert fb.balance_report(planted, "slice").counts  # the rest of the road reads it as an attribute


def test_rerun_is_refused_and_overwrite_replaces(planted, one_thread):
    first = fb.discover_slices(planted, "ground_truth", method="george", epochs=2, slices_per_class=2)
    with pytest.raises(fb.FairBalanceError, match="already exists"):
        fb.discover_slices(planted, "ground_truth", method="george", epochs=2, slices_per_class=2)
    view = planted.match(fo.ViewField("ground_truth.label") != "2")
    second = fb.discover_slices(view, "ground_truth", epochs=2, slices_per_class=3, overwrite=True)
    assert first.num_slices == 6 and second.num_slices == 6
    values = dict(zip(*planted.values(["ground_truth.label", "slice"])))
    # the old run's slices are gone from samples outside the new view: never mixed
    assert set(planted.match(fo.ViewField("ground_truth.label") == "2").values("slice")) == {None}
    assert {s.split("/")[0] for s in planted.exists("slice").values("slice")} == {"0", "1"}
    assert values  # every sample was read
    # a rerun with the same settings writes the same slices (deterministic for a seed)
    before = planted.values("slice")
    third = fb.discover_slices(view, "ground_truth", epochs=2, slices_per_class=3, overwrite=True)
    assert planted.values("slice") == before and [r["slice"] for r in third.slices] == [
        r["slice"] for r in second.slices]
    assert runs.get_run_config(planted, "slices")["method"] == "fairbalance.discover_slices"


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "domino"}, "method must be one of"),
    ({"slices_per_class": 0}, "slices_per_class"),
    ({"slice_field": "ground_truth"}, "label field"),
    ({"features_field": "nope"}, "not found"),
    ({"error_weight": -1.0}, "error_weight"),
])
def test_bad_input_fails_before_any_write(planted, kwargs, message):
    with pytest.raises(fb.FairBalanceError, match=message):
        fb.discover_slices(planted, "ground_truth", **kwargs)
    assert not planted.has_sample_field("slice") and "slices" not in planted.list_runs()


@pytest.mark.timeout(300)
def test_the_fields_that_may_name_are_chosen_checked_and_recorded(planted, one_thread):
    """Naming read every categorical field, so a benchmark's truth fields (bias_aligned) named slices: name_fields
    chooses the fields that may name, exclude_name_fields the ones that may not (ground truth, evaluation)."""
    planted.set_values("weight", [0.5] * len(planted))  # a float field: it cannot name
    kw = dict(epochs=4, slices_per_class=4, seed=0)
    for kwargs, message in [({"name_fields": ["nope"]}, "name_fields: no field 'nope'"),
                            ({"exclude_name_fields": ["bias_aligned"]}, "exclude_name_fields: no field"),
                            ({"name_fields": ["weight"]}, "'weight' not categorical"),
                            ({"name_fields": ["ground_truth"]}, "is the label field"),
                            ({"name_fields": "stroke"}, "must be a list of field names"),
                            ({"name_fields": ["stroke"], "exclude_name_fields": ["batch"]}, "not both")]:
        with pytest.raises(fb.FairBalanceError, match=message):  # before any work or write
            fb.discover_slices(planted, "ground_truth", **kwargs, **kw)
        assert not planted.has_sample_field("slice") and "slices" not in planted.list_runs()
    only = fb.discover_slices(planted, "ground_truth", name_fields=["stroke"], **kw)
    assert only.name_fields == ["stroke"] and "stroke = blue" in [r["name"] for r in only.slices]
    assert {n["field"] for r in only.slices for n in r["names"]} == {"stroke"}
    assert runs.get_run_config(planted, "slices")["name_fields"] == ["stroke"]
    out = fb.discover_slices(planted, "ground_truth", exclude_name_fields=["stroke"], overwrite=True, **kw)
    assert out.name_fields == ["batch"]  # the label, the run's own fields and the float field never name
    assert [r["slice"] for r in out.slices] == [r["slice"] for r in only.slices]  # names do not change slices
    assert not any(n["field"] == "stroke" for r in out.slices for n in r["names"])
    cfg = runs.get_run_config(planted, "slices")
    assert cfg["exclude_name_fields"] == ["stroke"] and cfg["name_fields"] is None
    # another discovery run's slices name nothing by default (slice 0/1 of one run would name slice 0/1 of the next)
    other = fb.discover_slices(planted, "ground_truth", run_key="again", slice_field="again", **kw)
    assert other.name_fields == ["stroke", "batch"] and "slice" not in other.name_fields


def test_find_slices_orders_by_error_and_scores_within_class():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (60, 5)), rng.normal(4, 1, (10, 5)), rng.normal(0, 1, (70, 5))])
    labels = np.array([0] * 70 + [1] * 70)
    errors = np.concatenate([np.full(60, 0.05), np.full(10, 0.9), np.full(70, 0.1)])
    fit = discovery.find_slices(x, labels, errors, "error_aware", slices_per_class=2)
    assert fit.slice_class.tolist() == [0, 0, 1, 1]
    assert set(fit.assign[60:70]) == {0}  # the failing group is slice 0 of class 0 (highest error first)
    assert (fit.scores[:70, 2:] == 0).all() and (fit.scores[70:, :2] == 0).all()


def test_operator_matches_sdk(digits_dataset, one_thread):
    import fiftyone.operators as foo

    op_ds, sdk_ds = digits_dataset.clone(), digits_dataset.clone()
    try:
        params = {"label_field": "ground_truth", "method": "george", "slices_per_class": 2, "epochs": 2,
                  "run_key": "sl", "slice_field": "sl"}
        result = foo.execute_operator("@fairbalance/fairbalance/discover_slices",
                                      ctx={"dataset": op_ds.name, "params": params})
        assert result.error is None, result.error
        sdk = fb.discover_slices(sdk_ds, "ground_truth", method="george", slices_per_class=2, epochs=2,
                                 run_key="sl", slice_field="sl")
        assert [r["slice"] for r in result.result["table"]] == [r["slice"] for r in sdk.slices]
        assert op_ds.values("sl") == sdk_ds.values("sl")
    finally:
        op_ds.delete()
        sdk_ds.delete()


def test_operator_form_offers_the_feature_sources_and_records_the_choice(digits_dataset, one_thread):
    """The form's multi-select holds the library's sources, its default pre-set; an empty or unknown choice is
    refused before Execute; a non-default choice reaches the recorded run config."""
    import asyncio

    import fiftyone.operators as foo
    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    from fairbalance.tag import slice_features

    def form(**params):
        request = {"dataset_name": digits_dataset.name, "params": {"label_field": "ground_truth", **params},
                   "target": "inputs"}
        prop = asyncio.run(resolve_type(OperatorRegistry(), "@fairbalance/fairbalance/discover_slices", request))
        return prop.type.properties

    exclude = form()["exclude_name_fields"]  # the fields that may not name: any categorical field but the label
    assert [c.value for c in exclude.view.choices] == ["color", "bias_aligned", "source_index"]
    assert form(num_shards=2)["classifier"].invalid  # shards need the classifier trained once, before them
    assert not form(num_shards=2, classifier="/some/folder")["classifier"].invalid
    sources = form()["feature_sources"]
    assert [c.value for c in sources.view.choices] == list(slice_features.SOURCES)
    assert sources.default == list(discovery.DEFAULT_SOURCES)
    assert not any(p.invalid for p in form(feature_sources=["pixels"]).values())
    assert form(feature_sources=[])["no_sources"].invalid
    assert form(feature_sources=["pixels", "clip"])["bad_sources"].invalid
    digits_dataset.set_values("emb", [[float(i % 3), 1.0] for i in range(len(digits_dataset))])
    try:
        assert form(feature_sources=["pixels"], features_field="emb")["features_unused"].invalid
        assert not any(p.invalid for p in form(feature_sources=["model"], features_field="emb").values())
    finally:
        digits_dataset.delete_sample_field("emb")

    ds = digits_dataset.clone()
    try:
        params = {"label_field": "ground_truth", "method": "george", "slices_per_class": 2, "epochs": 1,
                  "feature_sources": ["early", "pixels"], "run_key": "sl", "slice_field": "sl"}
        result = foo.execute_operator("@fairbalance/fairbalance/discover_slices",
                                      ctx={"dataset": ds.name, "params": params})
        assert result.error is None, result.error
        assert runs.get_run_config(ds, "sl")["feature_sources"] == ["early", "pixels"]
        assert result.result["feature_sources"] == ["early", "pixels"]
    finally:
        ds.delete()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_names_from_captions_and_the_clip_text_bank(digits_copy, tiny_clip, one_thread):
    """B2T keywords from a captions field; WordNet glosses when the features are CLIP embeddings whose model loads."""
    fb.compute_sa_features(digits_copy, "colors", ["red", "blue"], num_related_texts=4, model=tiny_clip,
                           pretrained=None, device="cpu", num_workers=0)
    colors = digits_copy.values("color.label")
    digits_copy.set_values("captions", [[f"a {c} digit on black", "a handwritten number"] for c in colors])
    res = fb.discover_slices(digits_copy, "ground_truth", features_field="clip_embedding", captions_field="captions",
                             epochs=2, slices_per_class=2)
    assert res.clip_naming.startswith("WordNet glosses")
    assert res.features == "clip_embedding"
    sources = {n["source"] for r in res.slices for n in r["names"]}
    assert {"clip", "metadata"} <= sources
    for r in res.slices:
        clip = [n for n in r["names"] if n["source"] == "clip"]
        assert len(clip) == 3 and all(n["text"] and -1 <= n["score"] <= 1 for n in clip)
        words = [n["text"] for n in r["names"] if n["source"] == "captions"]
        # a slice richer in one stroke colour than the rest of its class is named by that colour's word
        meta = [n for n in r["names"] if n["source"] == "metadata" and n["field"] == "color"]
        if meta and meta[0]["share_rest_of_class"] == 0:
            assert meta[0]["value"] in words


def test_balance_panel_lists_slices_by_error_gap_and_a_pick_filters_the_view(digits_copy, one_thread):
    import fiftyone.operators as foo

    res = fb.discover_slices(digits_copy, "ground_truth", method="george", epochs=2, slices_per_class=2)
    pick = res.slices[0]["slice"]  # the largest error gap first
    ctx = {"dataset": digits_copy.name, "params": {"__method__": "on_change_slice", "panel_id": "test-panel",
                                                    "panel_state": {"label_field": "ground_truth"}, "value": pick}}
    result = foo.execute_operator("@fairbalance/fairbalance/balance_panel", ctx=ctx)
    assert result.error is None, result.error
    assert result.result == {"filtered_to": f"slice {pick}", "num_samples": len(digits_copy.match({"slice": pick}))}
    assert result.result["num_samples"] == res.slices[0]["size"]
    panel = _panel_module().BalancePanel()
    found = _panel_module()._last_slices(digits_copy)
    assert found["run_key"] == "slices" and [r["slice"] for r in found["slices"]] == [
        r["slice"] for r in res.slices[:8]]
    assert panel is not None
    ctx["params"].update(__method__="render")
    rendered = foo.execute_operator("@fairbalance/fairbalance/balance_panel", ctx=ctx)
    assert rendered.error is None, rendered.error


def _panel_module():
    import importlib.util

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("fb_balance_panel_disc", os.path.join(REPO_ROOT, "panels",
                                                                                         "balance_panel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
