"""Sharded hardness losses: shards predict with one trained biased classifier, the merge ranks and tags."""

import os
import subprocess
import sys
import time

import fiftyone as fo
import numpy as np
import pytest
import torch

import fairbalance
from fairbalance.core import runs, sharding
from fairbalance.train import training
from fairbalance.tag.hardness import compute_hardness
from fairbalance.core.validation import FairBalanceError
from biased_model import FAST, biased_folder, by_id, with_generated_and_unlabelled  # noqa: F401 (a fixture)

FIFTYONE_CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone")


def _same_run(ds, single_key, sharded_key, single_fields, sharded_fields):
    """Results and config of two hardness runs, equal up to their run key, fields and tag."""
    def norm(key, fields):
        res, cfg = runs.load_run_results(ds, key), runs.get_run_config(ds, key)
        names = dict(zip(fields, ("LOSS", "RANK", "PRED", "TAG")))
        swap = lambda v: names.get(v, v) if isinstance(v, str) else v  # noqa: E731
        res = {k: swap(v) for k, v in res.items()}
        cfg = {k: swap(v) for k, v in cfg.items() if k not in ("started_at", "completed_at", "num_shards")}
        cfg["fields_written"] = [swap(f) for f in cfg["fields_written"]]
        return res, cfg

    return norm(single_key, single_fields) == norm(sharded_key, sharded_fields)


@pytest.mark.parametrize("top_k, per_class", [(None, True), (0.1, True), (25, False)])
def test_shards_in_any_order_equal_one_call_with_the_same_classifier(digits_copy, biased_folder, top_k, per_class):
    ds = with_generated_and_unlabelled(digits_copy)
    kw = dict(classifier=biased_folder, top_k=top_k, per_class=per_class)
    single = compute_hardness(ds, loss_field="loss_a", tag="hard_a", run_key="single", **kw)
    sharded = dict(loss_field="loss_b", tag="hard_b", run_key="sharded", num_shards=3, chunk_size=16, **kw)

    class Crash(Exception):
        pass

    def crash_after_two_chunks(pb):
        if len(ds.exists("loss_b")) >= 32:  # 2 chunks of 16 written
            raise Crash()

    with pytest.raises(Crash):  # a shard dies after writing 2 chunks
        compute_hardness(ds, shard=2, progress=fo.report_progress(crash_after_two_chunks, dt=0.0), **sharded)
    assert len(ds.exists("loss_b")) == 32
    results = []
    for shard in (2, 0, 1):  # any order; shard 2 resumes
        assert "sharded" not in runs.list_runs(ds, "hardness")  # no complete record before the merge
        assert not ds.has_field("loss_b_rank") and not len(ds.match_tags("hard_b"))  # ranks and tags at the merge
        results.append(compute_hardness(ds, shard=shard, **sharded))
    assert [r.merged for r in results] == [False, False, True]
    first = results[0]  # shard 2 resumed, not restarted
    assert first.num_resumed == 32 and first.num_processed == first.num_samples - first.num_left_out - 32
    assert sum(r.num_samples for r in results) == len(ds) and sum(r.num_left_out for r in results) == 7
    assert sum(r.num_processed for r in results) + 32 == len(ds) - 7 and fairbalance.sharded_status(
        ds, "sharded")["progress"] == 1.0
    real_labelled = ds.exists("ground_truth").match(fo.ViewField("generated") != True)  # noqa: E712
    assert single.num_samples == len(real_labelled) == len(ds) - 7 and single.num_skipped == 3
    for field in ("loss_a", "loss_b"):  # generated and unlabelled samples get no loss
        assert len(ds.exists(field)) == len(real_labelled) and not len(ds.match({"generated": True}).exists(field))
    a, b = by_id(ds, "loss_a"), by_id(ds, "loss_b")
    assert a.keys() == b.keys() and all((a[i] is None) == (b[i] is None) for i in a)
    assert np.allclose([a[i] for i in a if a[i] is not None], [b[i] for i in a if a[i] is not None], atol=1e-5)
    assert by_id(ds, "loss_a_rank") == by_id(ds, "loss_b_rank")
    assert by_id(ds, "loss_a_prediction") == by_id(ds, "loss_b_prediction")
    tagged_a, tagged_b = set(ds.match_tags("hard_a").values("id")), set(ds.match_tags("hard_b").values("id"))
    assert tagged_a == tagged_b and len(tagged_a) == single.num_tagged > 0
    merged = results[-1].results
    assert merged["tagged_ids"] == runs.load_run_results(ds, "single")["tagged_ids"]
    assert {k: merged[k] for k in ("num_tagged", "num_samples", "num_skipped", "checkpoint", "per_class_tagged",
                                   "train_history")} == {k: v for k, v in single.to_dict().items() if k in (
        "num_tagged", "num_samples", "num_skipped", "checkpoint", "per_class_tagged", "train_history")}
    assert _same_run(ds, "single", "sharded", ["loss_a", "loss_a_rank", "loss_a_prediction", "hard_a"],
                     ["loss_b", "loss_b_rank", "loss_b_prediction", "hard_b"])
    assert runs.get_run_config(ds, "sharded")["num_shards"] == 3
    if top_k is None:  # the error set: exactly the samples the classifier gets wrong
        clf = training.load_classifier(biased_folder)
        ids, paths, labels = real_labelled.values(["id", "filepath", "ground_truth.label"])
        wrong = training.predict(clf, paths).argmax(1).numpy() != np.array([int(v) for v in labels])
        assert tagged_b == {i for i, w in zip(ids, wrong) if w}
    # a shard run again does nothing; the run stays complete
    again = compute_hardness(ds, shard=0, **sharded)
    assert again.num_processed == 0 and again.merged


def test_classifier_is_validated_and_sharding_needs_one(digits_copy, biased_folder, tmp_path):
    import fiftyone.operators.delegated as food

    train = digits_copy.match_tags("train")
    svc = food.DelegatedOperationService()
    before = len(svc.list_operations(dataset_name=digits_copy.name))
    with pytest.raises(FairBalanceError, match=r"fairbalance.train_classifier\(view, label_field, method='biased'"):
        compute_hardness(train, shard=0, num_shards=2)
    with pytest.raises(FairBalanceError, match="trained once"):
        fairbalance.queue_sharded(train, "compute_hardness_tags", num_shards=2)
    with pytest.raises(FairBalanceError, match="no such folder"):
        fairbalance.queue_sharded(train, "compute_hardness_tags", num_shards=2, classifier=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FairBalanceError, match="not a loadable classifier"):
        compute_hardness(train, classifier=str(tmp_path / "empty"), shard=0, num_shards=2)
    with pytest.raises(FairBalanceError, match="drop epochs"):
        compute_hardness(train, classifier=biased_folder, epochs=50)
    with pytest.raises(FairBalanceError, match="overwrite"):
        compute_hardness(train, classifier=biased_folder, shard=0, num_shards=2, overwrite=True)
    two_classes = train.match(fo.ViewField("ground_truth.label").is_in(["0", "1"]))
    narrow = training.train_classifier(two_classes, training.TrainConfig(method="biased", **FAST))
    narrow = narrow.save(str(tmp_path / "narrow"))
    with pytest.raises(FairBalanceError, match=r"also has \['2', '3'"):
        compute_hardness(train, classifier=narrow)
    assert len(svc.list_operations(dataset_name=digits_copy.name)) == before  # nothing queued
    assert not digits_copy.has_field("bias_loss") and not digits_copy.has_run("hardness")
    assert not len(digits_copy.match_tags("bias_conflicting"))

    # a recorded train_classifier run, by its key: its model ranks the samples, nothing is trained
    fairbalance.train_classifier(train, method="biased", run_key="biased", output_dir=str(tmp_path / "run"), **FAST)
    result = compute_hardness(train, classifier_run="biased", top_k=20)
    clf = training.load_classifier(str(tmp_path / "run"))
    ids, paths, labels = train.values(["id", "filepath", "ground_truth.label"])
    expected = torch.nn.functional.cross_entropy(training.predict(clf, paths), torch.tensor([int(v) for v in labels]),
                                                 reduction="none").numpy()
    assert np.allclose(train.values("bias_loss"), expected, atol=1e-5)
    assert result.checkpoint == str(tmp_path / "run") and result.train_history == clf.history
    cfg = runs.get_run_config(digits_copy, "hardness")
    assert cfg["classifier_run"] == "biased" and cfg["training_method"] == "biased" and cfg["epochs"] == 3
    assert len(digits_copy.match_tags("bias_conflicting")) == 20


def _worker(log_path):
    """A real ``fiftyone delegated launch`` process with this session's database, plugin and library."""
    env = dict(os.environ)
    lib = os.path.dirname(os.path.dirname(fairbalance.__file__))  # this checkout's library, not an installed one
    env["PYTHONPATH"] = os.pathsep.join([lib] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.Popen([FIFTYONE_CLI, "delegated", "launch"], env=env, stdout=open(log_path, "w"),
                            stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_queued_shards_run_by_a_worker_replace_the_previous_run_and_its_tags(digits_copy, biased_folder, tmp_path):
    import signal

    ds = digits_copy
    single = compute_hardness(ds, classifier=biased_folder, loss_field="loss_a", tag="hard_a", run_key="single")
    # a previous run of the key, with another tag: overwriting the job removes its fields and its tags
    compute_hardness(ds.match_tags("test"), classifier=biased_folder, loss_field="loss_b", tag="old", run_key="job",
                     top_k=10)
    assert len(ds.match_tags("old")) == 10
    kw = dict(classifier=biased_folder, loss_field="loss_b", tag="hard_b", chunk_size=50)
    job = fairbalance.queue_sharded(ds, "compute_hardness_tags", num_shards=2, run_key="job", overwrite=True, **kw)
    assert sorted(job.queued) == [0, 1]
    assert not len(ds.match_tags("old")) and not ds.has_field("loss_b_rank")
    log = str(tmp_path / "worker.log")
    worker = _worker(log)
    try:
        deadline = time.time() + 300
        while not fairbalance.sharded_status(ds, "job")["merged"]:
            assert worker.poll() is None and time.time() < deadline, open(log).read()[-3000:]
            time.sleep(0.1)
    finally:
        worker.send_signal(signal.SIGINT)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    ds.reload()
    status = fairbalance.sharded_status(ds, "job")
    assert status["shards_done"] == 2 and status["num_done"] == len(ds)
    assert by_id(ds, "loss_a_rank") == by_id(ds, "loss_b_rank")
    assert set(ds.match_tags("hard_a").values("id")) == set(ds.match_tags("hard_b").values("id"))
    assert runs.load_run_results(ds, "job")["num_tagged"] == single.num_tagged
    assert _same_run(ds, "single", "job", ["loss_a", "loss_a_rank", "loss_a_prediction", "hard_a"],
                     ["loss_b", "loss_b_rank", "loss_b_prediction", "hard_b"])


def test_hardness_form_with_shards_queues_them_and_needs_a_classifier(digits_copy, biased_folder):
    import fiftyone.operators as foo
    import fiftyone.operators.delegated as food
    from fiftyone.operators.executor import ExecutionError

    uri = "@fairbalance/fairbalance/compute_hardness_tags"
    view = digits_copy.match_tags("train")
    params = {"label_field": "ground_truth", "num_shards": 2, "run_key": "form_sharded", "loss_field": "loss_form",
              "top_k": 15}
    with pytest.raises(ExecutionError, match="trained once"):  # the form refuses shards without a classifier
        foo.execute_operator(uri, ctx={"dataset": digits_copy.name, "view": view, "params": params})
    result = foo.execute_operator(uri, ctx={"dataset": digits_copy.name, "view": view,
                                            "params": {**params, "classifier": biased_folder}})
    assert result.error is None, result.error
    assert result.result["shards_queued"] == 2 and not digits_copy.has_field("loss_form")  # queued, not computed
    svc = food.DelegatedOperationService()
    queued = svc.list_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name, run_state="queued")
    assert sorted(op.label for op in queued) == [f"compute_hardness_tags 'form_sharded' shard {i}/2" for i in range(2)]
    svc.execute_queued_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name)  # a worker's loop
    digits_copy.reload()
    status = fairbalance.sharded_status(digits_copy, "form_sharded")
    assert status["merged"] and status["num_done"] == len(view)
    assert len(view.exists("loss_form")) == len(view) and not len(digits_copy.match_tags("test").exists("loss_form"))
    assert len(digits_copy.match_tags("bias_conflicting")) == 15
    assert runs.get_run_config(digits_copy, "form_sharded")["num_shards"] == 2


def test_shards_use_the_views_labels_not_the_datasets(digits_copy, biased_folder):
    """A view that maps labels (here 1 -> 7): shards compute their losses against the view's labels, as one call."""
    view = digits_copy.map_labels("ground_truth", {"1": "7"})
    single = compute_hardness(view, classifier=biased_folder, loss_field="loss_m", tag="hard_m", run_key="m1")
    for shard in (1, 0):
        compute_hardness(view, classifier=biased_folder, loss_field="loss_n", tag="hard_n", run_key="m2",
                         shard=shard, num_shards=2, chunk_size=64)
    a, b = by_id(digits_copy, "loss_m"), by_id(digits_copy, "loss_n")
    assert a.keys() == b.keys() and all(abs(a[i] - b[i]) < 1e-5 for i in a)
    assert runs.load_run_results(digits_copy, "m2")["tagged_ids"] == runs.load_run_results(
        digits_copy, "m1")["tagged_ids"] and single.num_tagged == len(digits_copy.match_tags("hard_n"))
