"""The plugin as FiftyOne sees it: discovered from FIFTYONE_PLUGINS_DIR, operators executed."""

import json
import os
import re

import numpy as np
import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.plugins as fop
import pytest
import yaml

from conftest import REPO_ROOT
from fairbalance.find import balance

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
    from fairbalance.datasets import colored_digits as datasets

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


@pytest.mark.slow  # ~25 s: both SA operators and their SDK twins on tiny CLIP
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
    from fairbalance.tag.hardness import compute_hardness

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
        assert res.result["model_selection"] == "the last epoch's weights (no validation set given)"
        res = foo.execute_operator(f"{PLUGIN}/apply_classifier", ctx={
            "dataset": op_ds.name, "params": {"classifier_run": "debiased", "attribute_field": "color"}})
        assert res.error is None, res.error
        assert op_ds.count("predictions") == len(op_ds)
        # for people (#25 item 15): percentages, groups in words with their sample counts, worst first, small
        # groups flagged and not ranked as the worst group
        assert re.fullmatch(r"\d{1,3}\.\d%", res.result["accuracy"])
        rows = res.result["group_table"]
        accs = [float(r["accuracy"].rstrip("%")) for r in rows]
        assert accs == sorted(accs) and sum(r["samples"] for r in rows) == len(op_ds)
        assert all(re.fullmatch(r"ground_truth \d, color \w+", r["group"]) for r in rows)
        assert all((r["samples"] < 5) == r["note"].startswith("small") for r in rows)
        assert any(r["samples"] < 5 for r in rows) and any(r["samples"] >= 5 for r in rows)
        big = [r for r in rows if r["samples"] >= 5][0]
        assert res.result["worst_group"] == f"{big['group']}: {big['accuracy']} of {big['samples']} samples"
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


def _triggered(result):
    """The App operations an operator asked for (reload, set view, ...), by name."""
    return [r.operator_uri for r in result.executor._requests] if result.executor else []


def test_writers_refresh_the_app_without_dropping_the_users_filters(digits_dataset):
    """A writer refreshes the samples; reload_dataset re-queried the page and dropped the sidebar filters (#25)."""
    ds = digits_dataset.clone()
    try:
        filters = {"tags": {"values": ["train"], "exclude": False, "isMatching": True}}
        res = foo.execute_operator(f"{PLUGIN}/compute_hardness_tags", ctx={
            "dataset": ds.name, "filters": filters, "params": {
                "label_field": "ground_truth", "top_k": 3, "backbone": "mlp", "image_size": 16, "epochs": 1,
                "view_target": "CURRENT_VIEW"}})
        assert res.error is None, res.error
        assert ds.count("bias_loss") == len(ds.match_tags("train"))  # it ran on the filtered view
        assert res.result["tagged_of"] == f"3 of {len(ds.match_tags('train'))} samples of the view"  # item 13
        assert "reload_samples" in _triggered(res) and "reload_dataset" not in _triggered(res)
    finally:
        ds.delete()


def test_filter_generated_form_refuses_what_the_library_would(digits_dataset, tmp_path):
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    ds = digits_dataset.clone()

    def problems(view=None, **params):
        request = {"dataset_name": ds.name, "params": {"label_field": "ground_truth", **params},
                   "target": "inputs", **({"view": view._serialize(), "params": {
                       "label_field": "ground_truth", "view_target": "CURRENT_VIEW", **params}} if view else {})}
        prop = asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN}/filter_generated", request))
        return {k: p.error_message for k, p in prop.type.properties.items() if p.invalid}

    try:
        assert "no_generated" in problems(method="pixels")  # no generated samples: said before Execute
        assert "Traceback" not in problems(method="pixels")["no_generated"]
        ds.add_samples([fo.Sample(filepath=str(tmp_path / f"g{i}.png"), generated=True,
                                  ground_truth=fo.Classification(label="0")) for i in range(3)])
        assert problems(method="pixels") == {}
        assert "no_real" in problems(ds.match_tags("train", bool=False).match({"generated": True}),
                                     method="pixels")
        assert "no_embeddings" in problems(method="clip", embeddings_field="no_such_field")
        with pytest.raises(Exception, match="no generated samples"):  # the executor checks the form too
            foo.execute_operator(f"{PLUGIN}/filter_generated", ctx={
                "dataset": ds.name, "view": ds.match_tags("train"),
                "params": {"label_field": "ground_truth", "method": "pixels", "view_target": "CURRENT_VIEW"}})
    finally:
        ds.delete()


def test_delete_run_lists_and_removes_what_the_run_wrote(digits_dataset, tmp_path):
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry
    from PIL import Image

    from fairbalance.core import runs
    from fairbalance.tag.hardness import compute_hardness

    ds = digits_dataset.clone()
    try:
        compute_hardness(ds, top_k=4, run_key="hard", backbone="mlp", image_size=16, epochs=1)
        # a generation run: its samples carry generation.run_key, their images are files
        files = []
        for i in range(2):
            files.append(str(tmp_path / f"g{i}.png"))
            Image.new("RGB", (8, 8)).save(files[-1])
        runs.prepare(ds, "gen", "generate_balanced", {"output_dir": str(tmp_path)}, [], False).write(
            lambda: ds.add_samples([fo.Sample(filepath=f, generated=True, tags=["generated"],
                                              generation={"run_key": "gen"}) for f in files]))
        request = {"dataset_name": ds.name, "params": {"run_key": "hard"}, "target": "inputs"}
        form = asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN}/delete_run", request)).type.properties
        assert list(form["run_key"].type.values) == ["gen", "hard"]  # newest first
        plan = form["plan"].view.label if form["plan"].view.label else ""
        plan = plan or str(form["plan"].to_json())
        assert "bias_loss" in plan and "bias_conflicting" in plan and "4 samples" in plan

        res = foo.execute_operator(f"{PLUGIN}/delete_run", ctx={"dataset": ds.name, "params": {"run_key": "hard"}})
        assert res.error is None, res.error
        assert not ds.has_run("hard") and not ds.has_field("bias_loss")
        assert len(ds.match_tags("bias_conflicting")) == 0
        assert res.result["samples_untagged"] == 4

        res = foo.execute_operator(f"{PLUGIN}/delete_run", ctx={"dataset": ds.name, "params": {"run_key": "gen"}})
        assert res.error is None, res.error
        assert res.result["generated_deleted"] == 2 and len(ds.match_tags("generated")) == 0
        assert not any(os.path.exists(f) for f in files) and not ds.has_run("gen")
    finally:
        ds.delete()


def test_forms_offer_a_free_field_after_the_audit(digits_dataset, tiny_clip):
    """After the one-click audit, SA features and pseudo-labels with their defaults were accepted by the form
    and failed after Execute ("written by run 'audit_sa_features'"): the forms offer a free name (#25)."""
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    from fairbalance import audit_balance

    ds = digits_dataset.clone()

    def form(op, params):
        request = {"dataset_name": ds.name, "params": params, "target": "inputs"}
        return asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN}/{op}", request)).type.properties

    try:
        audit_balance(ds, related_texts_override=["red", "green", "blue"], model=tiny_clip, pretrained=None)
        sa = form("compute_sa_features", {"source": "texts", "related_texts": "red, blue"})
        assert sa["features_field"].default == "sa_features_2" and not sa["features_field"].invalid
        typed = form("compute_sa_features", {"source": "texts", "related_texts": "red, blue",
                                             "features_field": "sa_features"})["features_field"]
        assert typed.invalid and "audit_sa_features" in typed.error_message and "sa_features_2" in \
            typed.error_message
        assert form("compute_pseudo_labels", {})["label_field"].default == "sa_cluster_2"
        foreign = form("compute_pseudo_labels", {"label_field": "color"})["label_field"]
        assert foreign.invalid and "not written by fairbalance" in foreign.error_message

        params = {"source": "texts", "related_texts": "red, blue", "model": tiny_clip, "pretrained": ""}
        res = foo.execute_operator(f"{PLUGIN}/compute_sa_features", ctx={"dataset": ds.name, "params": {
            **params, "features_field": sa["features_field"].default}})
        assert res.error is None, res.error
        assert ds.count("sa_features_2") == len(ds)
    finally:
        ds.delete()


def test_clip_forms_say_at_once_that_the_weights_are_missing_offline(digits_dataset, tiny_clip):
    """Offline, the default CLIP ran 29 s and then showed a traceback (#25): the form says so in one line."""
    import asyncio
    import time

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    def invalid(op, params):
        request = {"dataset_name": digits_dataset.name, "params": params, "target": "inputs"}
        props = asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN}/{op}", request)).type.properties
        return {k: p.error_message for k, p in props.items() if p.invalid}

    for op in ("compute_sa_features", "audit_balance"):
        start = time.time()
        problems = invalid(op, {"source": "texts", "related_texts": "red, blue"})  # the default ViT-B-32/openai
        assert time.time() - start < 10
        assert "clip_missing" in problems, problems
        assert "offline" in problems["clip_missing"] and "\n" not in problems["clip_missing"]
        assert "Traceback" not in problems["clip_missing"]
        assert "clip_missing" not in invalid(op, {"source": "texts", "related_texts": "red, blue", "model": tiny_clip,
                                                  "pretrained": ""})


def test_a_queued_sharded_run_says_it_is_queued_and_how_to_start_a_worker(digits_dataset):
    """A sharded run's result was titled "SA features computed" though only queued, named a Python function
    and gave no hint to start a worker (#25 item 11)."""
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    def output(results):
        request = {"dataset_name": digits_dataset.name, "params": {}, "target": "outputs", "results": results}
        return asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN}/compute_sa_features", request)).to_json()

    queued = json.dumps(output({"run_key": "sa", "num_shards": 2, "shards_queued": 2, "shards_requeued": 0}))
    assert "Queued for delegated workers" in queued and "fiftyone delegated launch" in queued
    assert "SA features computed" not in queued and "fairbalance.sharded_status" not in queued
    done = json.dumps(output({"run_key": "sa", "num_encoded": 3}))
    assert "SA features computed" in done and "when a worker picks them up" not in done
    # ran in the App while Schedule is NOT AVAILABLE: the dialog says how to enable it and start a worker (item 6)
    assert "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS=true" in done and "fiftyone delegated launch" in done


def test_quality_lines_after_training_and_generation(digits_dataset, tmp_path):
    """A 4-step diffusion model produced noise labelled '0 blue' without a warning; 'Samples tagged: 84' had no
    'of N' (#25 item 13): training says its steps against a sensible minimum, generation how many images an
    independent check (the strokes' colour) confirms, filtering 'N of M'."""
    from fiftyone import ViewField as F

    ds = digits_dataset.clone()
    try:
        train = foo.execute_operator(f"{PLUGIN}/train_conditional_diffusion", ctx={
            "dataset": ds.name, "view": ds.limit(12),
            "params": {"label_field": "color", "epochs": 1, "batch_size": 32, "image_size": 16, "run_key": "weak",
                       "view_target": "CURRENT_VIEW"}})
        assert train.error is None, train.error
        steps = train.result["steps"]
        assert steps < 500 and train.result["quality"].startswith(f"Weak: {steps} training steps, below the ~500")
        gen = foo.execute_operator(f"{PLUGIN}/generate_balanced", ctx={
            "dataset": ds.name, "params": {"label_field": "color", "diffusion_run": "weak", "mode": "equal",
                                           "total": 8, "num_inference_steps": 2, "run_key": "g"}})
        assert gen.error is None, gen.error
        mine = ds.match(F("generation.run_key") == "g")
        from fairbalance.datasets.colored_digits import nearest_color

        ok = sum(nearest_color(p) == c for p, c in zip(*mine.values(["filepath", "color.label"])))
        quality = gen.result["quality"]
        assert quality.startswith(f"Weak: {steps} training steps")  # the model's own warning is repeated
        assert f"{ok} of {len(mine)} generated images ({round(100 * ok / len(mine))}%) show the colour" in quality
        filt = foo.execute_operator(f"{PLUGIN}/filter_generated", ctx={
            "dataset": ds.name, "params": {"label_field": "color", "method": "pixels", "bottom_fraction": 0.4}})
        assert filt.error is None, filt.error
        assert filt.result["tagged_of"] == f"{filt.result['num_tagged']} of the {len(mine)} generated samples scored"
    finally:
        ds.delete()


def test_generate_form_follows_the_model(digits_dataset, tmp_path):
    """The generate form defaulted the cluster field to sa_cluster while the only model was trained on color,
    and offered cells mode for a single-factor model; accepted, then a traceback (#25 item 9)."""
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    import fairbalance as fb

    ds = digits_dataset.clone()

    def form(params):
        request = {"dataset_name": ds.name, "params": params, "target": "inputs"}
        return asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN}/generate_balanced", request)).type.properties

    try:
        ds.set_values("sa_cluster", [fo.Classification(label=c) for c in ds.values("ground_truth.label")])
        fb.train_conditional_diffusion(ds.limit(12), "color", output_dir=str(tmp_path / "m"), epochs=1,
                                       run_key="on_color", image_size=16, block_out_channels=(16, 32), batch_size=32)
        props = form({})
        assert props["label_field"].default == "color"  # the model's field, not sa_cluster
        assert "cells" not in props["mode"].type.values  # a single-factor model cannot fill cells
        wrong = form({"label_field": "sa_cluster", "diffusion_run": "on_color"})
        assert wrong["field_mismatch"].invalid and "trained on 'color'" in wrong["field_mismatch"].error_message
        assert "field_mismatch" not in form({"label_field": "color", "diffusion_run": "on_color"})
    finally:
        ds.delete()


def test_create_dataset_forms_refuse_an_existing_name_in_the_apps_words(digits_dataset):
    """An existing dataset name was refused only after Execute, with "pass overwrite=True" (#25 item 10)."""
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    def invalid(op, params):
        request = {"params": params, "target": "inputs"}
        props = asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN}/{op}", request)).type.properties
        return {k: p.error_message for k, p in props.items() if p.invalid}

    for op in ("create_colored_digits", "create_colored_mnist"):
        taken = invalid(op, {"name": digits_dataset.name})
        assert "name_taken" in taken and "overwrite=True" not in taken["name_taken"]
        assert invalid(op, {"name": digits_dataset.name, "overwrite": True}) == {}
        assert invalid(op, {"name": "fb-no-such-dataset"}) == {}


def test_the_operator_browser_finds_what_a_user_types():
    """Typing "fairbalance audit" or "fairbalance train" found nothing: labels read "fairbalance 1 find · ..."
    (#25 item 14). The App's browser keeps operators whose label, URI or description contains the query."""
    ops = {op.name: op.config for op in foo.list_operators() if op.plugin_name == PLUGIN}

    def found(query):
        q = query.lower()
        return sorted(n for n, c in ops.items() if q in (c.label or "").lower() or q in (c.description or "").lower())

    assert found("fairbalance audit") == ["audit_balance"]
    assert found("fairbalance train") == ["train_classifier", "train_conditional_diffusion"]
    assert ops["audit_balance"].label == "fairbalance audit hidden imbalance · 1 find"
    assert ops["audit_balance"].description.startswith("1 find · ")  # the browser's order follows the road


def test_audit_and_balance_report_read_as_tables_in_plain_words(digits_dataset):
    """Audit and balance report repeated their tables as a monospace "Report" block ("max ln|C|") (#25 item 15):
    now a table of samples per class or cluster (largest first, shares, small groups flagged) and one plain line."""
    view = digits_dataset.match_tags("train").limit(40)
    res = foo.execute_operator(f"{PLUGIN}/balance_report", ctx={
        "dataset": digits_dataset.name, "view": view,
        "params": {"label_field": "color", "view_target": "CURRENT_VIEW"}})
    assert res.error is None, res.error
    out = res.result
    assert "summary" not in out and "max ln" not in json.dumps(out)
    counts = balance.balance_report(view, "color").counts
    assert [(r["label"], r["count"]) for r in out["table"]] == sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    assert all((r["count"] < 5) == (r["note"] != "") for r in out["table"])
    big, small = max(counts.values()), min(counts.values())
    assert out["reading"].startswith(f"{len(counts)} groups, ") and f"the largest has {big} samples, the " \
                                                                       f"smallest {small}" in out["reading"]


def test_progress_says_steps_done_of_the_total():
    """Runs showed only a percentage (or "Executing...") with no steps or time left (#25 item 17): the progress a
    scheduled run reports through FiftyOne's ExecutionContext says steps done of the total, and the time left."""
    import time

    import fiftyone.core.utils as fou
    from fiftyone.operators.executor import ExecutionContext

    import operators._common as common  # the plugin's own module, as FiftyOne loads it

    seen = []
    ctx = ExecutionContext({"params": {}}, set_progress=lambda _id, p: seen.append((p.progress, p.label)),
                           delegated_operation_id="op")
    with fou.ProgressBar(total=6, progress=common.progress_callback(ctx, "Training steps")) as pb:
        for _ in range(6):
            time.sleep(0.3)
            pb.update()
    assert seen and seen[-1] == (1.0, "Training steps: 6 of 6 (100%)")
    assert all(label.startswith("Training steps: ") and " of 6 (" in label for _, label in seen)
    assert common.progress_label("Generating", 120, 900, 130) == "Generating: 120 of 900 (13%), about 2 min left"
    assert common.progress_label("Generating", 5, 10, 12.4) == "Generating: 5 of 10 (50%), about 12 s left"


def test_panel_entropy_pair_stays_on_one_line():
    """"1.608 / 1.609" wrapped in the panel's numbers table (#25 item 16): no-break spaces hold the pair."""
    from panels.balance_panel import _numbers_markdown

    row = {"num_samples": 240, "entropy": 1.6081, "max_entropy": 1.6094, "normalized_entropy": 0.9992,
           "imbalance_ratio": 1.1}
    md = _numbers_markdown({"before": row, "after": row})
    assert md.count("1.608\u00a0/\u00a01.609") == 2 and "1.608 / 1.609" not in md


def test_hardness_form_needs_a_trained_classifier_for_shards(digits_dataset):
    """Shards of compute_hardness_tags would each train their own biased model: the form asks for one trained
    first (the same check as discover_slices's form), and with a folder given it offers no GCE training settings."""
    import asyncio

    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    def form(**params):
        request = {"dataset_name": digits_dataset.name, "params": {"label_field": "ground_truth", **params},
                   "target": "inputs"}
        prop = asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN}/compute_hardness_tags", request))
        return prop.type.properties

    assert not form()["classifier"].invalid and "q" in form()
    assert "trained once first" in form(num_shards=2)["classifier"].error_message
    given = form(num_shards=2, classifier="/some/folder")
    assert not given["classifier"].invalid and "q" not in given
