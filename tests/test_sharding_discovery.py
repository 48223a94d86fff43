"""Sharded slice discovery: shards run one trained classifier on their images, the merge clusters and names once."""

import os
import signal
import subprocess
import sys
import time

import fiftyone as fo
import numpy as np
import pytest

import fairbalance
from fairbalance.core import runs, sharding
from fairbalance.core.validation import FairBalanceError
from biased_model import FAST, biased_folder, by_id, with_generated_and_unlabelled  # noqa: F401 (a fixture)

FIFTYONE_CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone")
SETTINGS = dict(slices_per_class=3, seed=0)


def _normalised(ds, key, slice_field):
    """A discovery run's results and config with its own field names replaced, and no times or shard count."""
    names = {slice_field: "SLICE", f"{slice_field}_score": "SCORE"}
    res = {k: names.get(v, v) if isinstance(v, str) else v for k, v in runs.load_run_results(ds, key).items()}
    res.pop("run_key", None)
    cfg = {k: names.get(v, v) if isinstance(v, str) else v for k, v in runs.get_run_config(ds, key).items()
           if k not in ("started_at", "completed_at", "num_shards", "fields_written")}
    return res, cfg


@pytest.mark.timeout(600)
def test_shards_in_any_order_give_the_slices_of_one_call(digits_copy, biased_folder, one_thread):
    ds = with_generated_and_unlabelled(digits_copy)
    single = fairbalance.discover_slices(ds, classifier=biased_folder, slice_field="sa", run_key="single",
                                         **SETTINGS)
    sharded = dict(classifier=biased_folder, slice_field="sb", run_key="sharded", num_shards=3, chunk_size=16,
                   **SETTINGS)

    class Crash(Exception):
        pass

    def crash_after_two_chunks(pb):
        if len(ds.exists("sb_features")) >= 32:  # 2 chunks of 16 written
            raise Crash()

    with pytest.raises(Crash):  # a shard dies after writing 2 chunks
        fairbalance.discover_slices(ds, shard=2, progress=fo.report_progress(crash_after_two_chunks, dt=0.0),
                                    **sharded)
    assert len(ds.exists("sb_features")) == 32
    results = []
    for shard in (2, 0, 1):  # any order; shard 2 resumes
        assert "sharded" not in runs.list_runs(ds, "discover_slices")  # no complete record before the merge
        assert not ds.has_field("sb")  # the slices are made by the merge, from all outputs
        results.append(fairbalance.discover_slices(ds, shard=shard, **sharded))
    assert [r.merged for r in results] == [False, False, True]
    assert results[0].num_resumed == 32 and sum(r.num_left_out for r in results) == 7
    assert fairbalance.sharded_status(ds, "sharded")["progress"] == 1.0
    real_labelled = ds.exists("ground_truth").match(fo.ViewField("generated") != True)  # noqa: E712
    assert single.num_samples == len(real_labelled) == len(ds) - 7 and single.num_skipped == 3
    for field in ("sa", "sb", "sb_features"):  # generated and unlabelled samples get nothing
        assert len(ds.exists(field)) == len(real_labelled) and not len(ds.match({"generated": True}).exists(field))
    # the same slices, scores and records as one call with the same classifier, settings and seed
    assert by_id(ds, "sa") == by_id(ds, "sb") and single.num_slices == 30
    a, b = by_id(ds, "sa_score"), by_id(ds, "sb_score")
    assert all((a[i] is None) == (b[i] is None) for i in a)
    assert np.allclose([a[i] for i in a if a[i] is not None], [b[i] for i in a if a[i] is not None], atol=1e-5)
    res_a, cfg_a = _normalised(ds, "single", "sa")
    res_b, cfg_b = _normalised(ds, "sharded", "sb")
    assert cfg_a == cfg_b and cfg_a["classifier"] == biased_folder and cfg_a["trained_here"] is False
    assert [(r["slice"], r["size"], r["errors"], r["name"]) for r in res_a["slices"]] == [
        (r["slice"], r["size"], r["errors"], r["name"]) for r in res_b["slices"]]
    assert np.allclose([r["error_gap"] for r in res_a["slices"]], [r["error_gap"] for r in res_b["slices"]])
    assert res_a["name_fields"] == res_b["name_fields"] == ["color", "bias_aligned", "source_index", "generated"]
    stored = runs.get_run_config(ds, "sharded")
    assert stored["num_shards"] == 3 and stored["fields_written"] == ["sb", "sb_score", "sb_features"]
    assert results[-1].results["slices"] == runs.load_run_results(ds, "sharded")["slices"]
    again = fairbalance.discover_slices(ds, shard=0, **sharded)  # a shard run again does nothing
    assert again.num_processed == 0 and again.merged
    # the run deletes like any other: its fields, the shards' outputs included
    runs.delete_run(ds, "sharded", cleanup=True)
    assert not ds.has_field("sb") and not ds.has_field("sb_features")


def test_sharded_discovery_needs_a_trained_classifier_and_is_checked_first(digits_copy, biased_folder, tmp_path):
    import fiftyone.operators.delegated as food

    train = digits_copy.match_tags("train")
    svc = food.DelegatedOperationService()
    before = len(svc.list_operations(dataset_name=digits_copy.name))
    with pytest.raises(FairBalanceError, match=r"trained once, before the shards"):
        fairbalance.discover_slices(train, shard=0, num_shards=2)
    with pytest.raises(FairBalanceError, match=r"train_classifier\(view, label_field, method='biased'"):
        fairbalance.queue_sharded(train, "discover_slices", num_shards=2)
    with pytest.raises(FairBalanceError, match="no such folder"):
        fairbalance.queue_sharded(train, "discover_slices", num_shards=2, classifier=str(tmp_path / "nope"))
    with pytest.raises(FairBalanceError, match="drop epochs"):
        fairbalance.queue_sharded(train, "discover_slices", num_shards=2, classifier=biased_folder, epochs=50)
    with pytest.raises(FairBalanceError, match="no field 'nope'"):
        fairbalance.queue_sharded(train, "discover_slices", num_shards=2, classifier=biased_folder,
                                  exclude_name_fields=["nope"])
    with pytest.raises(FairBalanceError, match="overwrite"):
        fairbalance.discover_slices(train, classifier=biased_folder, shard=0, num_shards=2, overwrite=True)
    assert len(svc.list_operations(dataset_name=digits_copy.name)) == before  # nothing queued
    assert not digits_copy.has_field("slice_features") and not digits_copy.has_run("slices")


@pytest.mark.timeout(600)
def test_discovery_form_with_shards_queues_them_and_a_worker_runs_them(digits_copy, biased_folder, one_thread):
    import fiftyone.operators as foo
    import fiftyone.operators.delegated as food
    from fiftyone.operators.executor import ExecutionError

    uri = "@fairbalance/fairbalance/discover_slices"
    view = digits_copy.match_tags("train")
    params = {"label_field": "ground_truth", "num_shards": 2, "run_key": "form_sharded", "slice_field": "sl",
              "slices_per_class": 2, "exclude_name_fields": ["bias_aligned"]}
    with pytest.raises(ExecutionError, match="trained once"):  # the form refuses shards without a classifier
        foo.execute_operator(uri, ctx={"dataset": digits_copy.name, "view": view, "params": params})
    result = foo.execute_operator(uri, ctx={"dataset": digits_copy.name, "view": view,
                                            "params": {**params, "classifier": biased_folder}})
    assert result.error is None, result.error
    assert result.result["shards_queued"] == 2 and not digits_copy.has_field("sl")  # queued, not computed
    svc = food.DelegatedOperationService()
    queued = svc.list_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name, run_state="queued")
    assert sorted(op.label for op in queued) == [f"discover_slices 'form_sharded' shard {i}/2" for i in range(2)]
    svc.execute_queued_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name)  # a worker's loop
    digits_copy.reload()
    status = fairbalance.sharded_status(digits_copy, "form_sharded")
    assert status["merged"] and status["num_done"] == len(view)
    assert len(view.exists("sl")) == len(view) and not len(digits_copy.match_tags("test").exists("sl"))
    cfg = runs.get_run_config(digits_copy, "form_sharded")
    assert cfg["num_shards"] == 2 and cfg["exclude_name_fields"] == ["bias_aligned"]
    assert "bias_aligned" not in runs.load_run_results(digits_copy, "form_sharded")["name_fields"]
    # the same slices as one call with the same classifier and settings
    single = fairbalance.discover_slices(view, classifier=biased_folder, slice_field="one", run_key="one",
                                         slices_per_class=2, exclude_name_fields=["bias_aligned"])
    assert by_id(view, "one") == by_id(view, "sl") and single.num_slices == 20


@pytest.mark.timeout(600)
def test_the_command_line_queues_discovery_shards_and_names_only_the_chosen_fields(digits_copy, one_thread, capsys):
    """``fairbalance queue-sharded DATASET discover_slices`` as for the other shardable writers; the naming options
    on ``discover-slices`` itself."""
    import json

    import fiftyone.operators.delegated as food

    from fairbalance.ops import cli

    view = digits_copy.match_tags("train")
    fairbalance.train_classifier(view, method="biased", run_key="biased", **FAST)
    assert cli.main(["queue-sharded", digits_copy.name, "discover_slices", "classifier_run=biased",
                     "slices_per_class=2", "exclude_name_fields=[bias_aligned, source_index]",
                     "--view", "train", "--num-shards", "2", "--run-key", "cli_sharded", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["run_key"] == "cli_sharded" and len(job["queued"]) == 2
    svc = food.DelegatedOperationService()
    svc.execute_queued_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name)  # a worker's loop
    digits_copy.reload()
    assert fairbalance.sharded_status(digits_copy, "cli_sharded")["merged"]
    assert runs.load_run_results(digits_copy, "cli_sharded")["name_fields"] == ["color"]
    assert cli.main(["discover-slices", digits_copy.name, "--view", "train", "--classifier-run", "biased",
                     "--slices-per-class", "2", "--name-fields", "color", "--slice-field", "one", "--run-key", "one",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["name_fields"] == ["color"] and runs.get_run_config(digits_copy, "one")["name_fields"] == ["color"]
    assert by_id(view, "one") == by_id(view, "slice")  # one call, the same slices as the shards'


def test_shards_with_a_features_field_store_no_penultimate_layer_and_give_the_same_slices(digits_copy, biased_folder,
                                                                                         one_thread):
    """A vector field stands for the model source: the shards store only what the merge cannot read elsewhere."""
    view = digits_copy.match_tags("train")
    rng = np.random.default_rng(0)
    digits_copy.set_values("emb", [rng.normal(size=8).astype(np.float32) for _ in range(len(digits_copy))])
    kw = dict(classifier=biased_folder, features_field="emb", feature_sources=["model", "pixels"], **SETTINGS)
    fairbalance.discover_slices(view, slice_field="one", run_key="one", **kw)
    for shard in (1, 0):
        fairbalance.discover_slices(view, slice_field="two", run_key="two", shard=shard, num_shards=2, **kw)
    assert by_id(view, "one") == by_id(view, "two")
    job = sharding.get_job(view, "two")
    assert job["shared"]["layout"] == {"logits": 10, "pixels": 23}  # no penultimate layer: the field stands for it
    assert len(view.first()["two_features"]) == 33


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_queued_shards_run_by_a_real_worker_give_the_slices_of_one_call(digits_copy, biased_folder, tmp_path):
    """Two shards queued, run by a real ``fiftyone delegated launch`` process; the merge equals one call."""
    ds = digits_copy
    kw = dict(classifier=biased_folder, exclude_name_fields=["bias_aligned"], **SETTINGS)
    single = fairbalance.discover_slices(ds, slice_field="one", run_key="one", **kw)
    job = fairbalance.queue_sharded(ds, "discover_slices", num_shards=2, run_key="job", slice_field="two",
                                    chunk_size=50, **kw)
    assert sorted(job.queued) == [0, 1] and not ds.has_field("two")
    env = dict(os.environ)
    lib = os.path.dirname(os.path.dirname(fairbalance.__file__))  # this checkout's library, not an installed one
    env["PYTHONPATH"] = os.pathsep.join([lib] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    log = str(tmp_path / "worker.log")
    worker = subprocess.Popen([FIFTYONE_CLI, "delegated", "launch"], env=env, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 400
        while not fairbalance.sharded_status(ds, "job")["merged"]:
            assert worker.poll() is None and time.time() < deadline, open(log).read()[-3000:]
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    ds.reload()
    assert fairbalance.sharded_status(ds, "job")["num_done"] == len(ds)
    assert by_id(ds, "one") == by_id(ds, "two")
    res_a, cfg_a = _normalised(ds, "one", "one")
    res_b, cfg_b = _normalised(ds, "job", "two")
    assert cfg_a == cfg_b and single.num_slices == 30
    assert [(r["slice"], r["size"], r["errors"], r["name"]) for r in res_a["slices"]] == [
        (r["slice"], r["size"], r["errors"], r["name"]) for r in res_b["slices"]]
    assert res_a["name_fields"] == res_b["name_fields"] and "bias_aligned" not in res_b["name_fields"]
