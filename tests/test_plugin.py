"""The plugin as FiftyOne sees it: discovered from FIFTYONE_PLUGINS_DIR, operators executed."""

import numpy as np
import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.plugins as fop
import pytest
import yaml

from conftest import REPO_ROOT
from fairbalance import balance

PLUGIN = "@fairbalance/fairbalance"


def test_plugin_discovered_and_manifest_complete():
    plugins = {p.name: p for p in fop.list_plugins()}
    assert PLUGIN in plugins
    manifest = yaml.safe_load(open(f"{REPO_ROOT}/fiftyone.yml"))
    assert manifest["py_entry"] == "fiftyone_plugin/__init__.py"
    from fiftyone.plugins.context import build_plugin_contexts

    errors = [e for ctx in build_plugin_contexts() if ctx.name == PLUGIN for e in ctx.errors]
    assert errors == []
    registered = {op.name for op in foo.list_operators() if op.plugin_name == PLUGIN}
    declared = set(manifest.get("operators", [])) | set(manifest.get("panels", []))
    assert registered == declared, "every operator/panel must be listed in fiftyone.yml"


def test_create_colored_digits_operator_matches_sdk():
    from fairbalance import datasets

    try:
        result = foo.execute_operator(
            f"{PLUGIN}/create_colored_digits",
            ctx={"params": {"name": "fb-op-digits", "num_classes": 3, "train_per_class": 6,
                            "test_per_class": 2, "conflict_ratio": 0.05, "seed": 5}},
        )
        assert result.error is None, result.error
        assert result.result["num_train"] == 18 and result.result["train_bias_conflicting"] == 3
        op_ds = fo.load_dataset("fb-op-digits")
        sdk_ds = datasets.colored_digits("fb-sdk-digits", num_classes=3, train_per_class=6, test_per_class=2,
                                         conflict_ratio=0.05, seed=5, persistent=False)
        fields = ["ground_truth.label", "color.label", "bias_aligned", "source_index", "tags"]
        assert op_ds.values(fields) == sdk_ds.values(fields)
    finally:
        for name in ("fb-op-digits", "fb-sdk-digits"):
            if fo.dataset_exists(name):
                fo.delete_dataset(name)


def test_balance_report_operator_matches_sdk(digits_dataset):
    view = digits_dataset.match_tags("train")
    result = foo.execute_operator(
        f"{PLUGIN}/balance_report",
        ctx={"dataset": digits_dataset.name, "view": view,
             "params": {"label_field": "color", "attribute_field": "ground_truth", "view_target": "CURRENT_VIEW"}},
    )
    assert result.error is None, result.error
    sdk = balance.balance_report(view, "color", attribute_field="ground_truth")
    assert result.result["counts"] == sdk.counts
    assert result.result["entropy"] == round(sdk.entropy, 3)  # rounded for people
    assert len(result.result["cross_table"]) == sdk.num_classes


def test_balance_report_operator_reports_bad_input(digits_dataset):
    from fiftyone.operators.executor import ExecutionError

    with pytest.raises(ExecutionError, match="label_field"):  # form validation: not a field choice
        foo.execute_operator(
            f"{PLUGIN}/balance_report",
            ctx={"dataset": digits_dataset.name, "params": {"label_field": "no_such_field"}},
        )
    with pytest.raises(ExecutionError, match="empty"):  # library validation, surfaced to the App
        foo.execute_operator(
            f"{PLUGIN}/balance_report",
            ctx={"dataset": digits_dataset.name, "view": digits_dataset.limit(0),
                 "params": {"label_field": "color", "view_target": "CURRENT_VIEW"}},
        )


def test_sa_and_pseudo_label_operators_match_sdk(digits_dataset, tiny_clip):
    from fairbalance import compute_pseudo_labels, compute_sa_features

    op_ds = digits_dataset.clone()
    sdk_ds = digits_dataset.clone()
    try:
        params = {"attribute": "colors", "attribute_values": "red, blue", "num_related_texts": 4,
                  "model": tiny_clip, "pretrained": "", "run_key": "sa", "features_field": "sa_features"}
        result = foo.execute_operator(f"{PLUGIN}/compute_sa_features", ctx={"dataset": op_ds.name, "params": params})
        assert result.error is None, result.error
        sdk = compute_sa_features(sdk_ds, "colors", ["red", "blue"], num_related_texts=4, model=tiny_clip,
                                  pretrained=None, run_key="sa", num_workers=0)
        assert result.result["related_texts"] == [{**r, "score": round(r["score"], 3)} for r in sdk.related_texts]
        assert np.array_equal(np.stack(op_ds.values("sa_features")), np.stack(sdk_ds.values("sa_features")))

        assert np.allclose(np.stack(op_ds.values("sa_features")), np.stack(sdk_ds.values("sa_features")), atol=1e-6)

        params = {"features_field": "sa_features", "label_field": "cl", "method": "xmeans", "kmax": 6,
                  "criterion": "bic", "run_key": "pl"}
        result = foo.execute_operator(f"{PLUGIN}/compute_pseudo_labels", ctx={"dataset": op_ds.name, "params": params})
        assert result.error is None, result.error
        sdk = compute_pseudo_labels(sdk_ds, label_field="cl", kmax=6, criterion="bic", run_key="pl")
        assert result.result["counts"] == sdk.counts
        assert op_ds.values("cl.label") == sdk_ds.values("cl.label")
    finally:
        op_ds.delete()
        sdk_ds.delete()


def test_hardness_train_apply_operators_match_sdk(digits_dataset):
    from fairbalance.hardness import compute_hardness

    op_ds, sdk_ds = digits_dataset.clone(), digits_dataset.clone()
    fast = {"backbone": "mlp", "image_size": 16, "epochs": 2, "batch_size": 64, "seed": 0}
    try:
        params = {"label_field": "ground_truth", "top_k": 12, "run_key": "hard", **fast}
        res = foo.execute_operator(f"{PLUGIN}/compute_hardness_tags", ctx={"dataset": op_ds.name, "params": params})
        assert res.error is None, res.error
        sdk = compute_hardness(sdk_ds, top_k=12, run_key="hard", **fast)
        assert res.result["num_tagged"] == sdk.num_tagged == 12
        assert op_ds.values("bias_loss") == pytest.approx(sdk_ds.values("bias_loss"), rel=1e-5)
        tagged = lambda ds: sorted(ds.match_tags("bias_conflicting").values("filepath"))  # noqa: E731
        assert tagged(op_ds) == tagged(sdk_ds)  # clones share files, not ids

        params = {"label_field": "ground_truth", "method": "jtt", "hard_tag": "bias_conflicting", "upweight": 10.0,
                  "run_key": "debiased", **fast}
        res = foo.execute_operator(f"{PLUGIN}/train_classifier", ctx={"dataset": op_ds.name, "params": params})
        assert res.error is None, res.error
        res = foo.execute_operator(f"{PLUGIN}/apply_classifier", ctx={
            "dataset": op_ds.name, "params": {"classifier_run": "debiased", "attribute_field": "color"}})
        assert res.error is None, res.error
        assert op_ds.count("predictions") == len(op_ds)
        assert 0 <= res.result["worst_group_accuracy"] <= res.result["accuracy"] <= 1
    finally:
        op_ds.delete()
        sdk_ds.delete()


def test_audit_operator_runs_the_chain(digits_dataset, tiny_clip):
    ds = digits_dataset.clone()
    try:
        res = foo.execute_operator(f"{PLUGIN}/audit_balance", ctx={"dataset": ds.name, "params": {
            "attribute": "colors", "model": tiny_clip, "pretrained": ""}})
        assert res.error is None, res.error
        assert res.result["num_clusters"] == len(ds.distinct("sa_cluster.label"))
        assert len(res.result["related_texts"]) == 20
        assert round(balance.balance_report(ds, "sa_cluster").entropy, 3) == res.result["entropy"]
    finally:
        ds.delete()


def test_sa_features_form_accepts_related_texts_alone(digits_dataset):
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    def form(params):
        request = {"dataset_name": digits_dataset.name, "params": params, "target": "inputs"}
        prop = asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN}/compute_sa_features", request))
        return prop.type.properties

    assert form({"attribute": None})["attribute"].required  # no AttributeError on an empty attribute
    by_texts = form({"attribute": None, "related_texts": "red ink, blue ink"})  # the alternative, chosen
    assert "attribute" not in by_texts and by_texts["related_texts"].required
    assert not by_texts["related_texts"].invalid
    assert form({"source": "texts", "related_texts": "only one"})["related_texts"].invalid
    assert form({"source": "wordnet", "related_texts": "red ink, blue ink"})["attribute"].required
