"""Sharded, resumable SA features on FiftyOne's delegated service, with real ``fiftyone delegated launch`` workers."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fairbalance
from fairbalance.core import runs, sharding
from fairbalance.find.pseudo_labels import compute_pseudo_labels
from fairbalance.find.sa_features import compute_sa_features
from fairbalance.core.validation import FairBalanceError

FIFTYONE_CLI = os.path.join(os.path.dirname(sys.executable), "fiftyone")


@pytest.fixture
def sa_kwargs(tiny_clip):
    """The settings of every run here: tiny CLIP and 5 related texts (given: WordNet is test_sa_features' part)."""
    return dict(related_texts_override=["a red digit", "a green digit", "a blue digit", "a yellow digit",
                                        "a white digit"], model=tiny_clip, pretrained=None, device="cpu",
                num_workers=0)


def _features(ds, field):
    ids, feats = ds.values(["id", field])
    return dict(zip(ids, feats))


def _same_partition(a, b):
    """Two labelings are the same clustering (up to renaming the clusters)."""
    pairs = set(zip(a, b))
    return len(pairs) == len(set(a)) == len(set(b))


def test_split_is_deterministic_complete_and_validated(digits_dataset):
    ids = digits_dataset.values("id")
    shards = [[i for i in ids if sharding.shard_of(i, 4) == s] for s in range(4)]
    assert sorted(sum(shards, [])) == sorted(ids)  # every sample in exactly one shard
    assert all(abs(len(s) - len(ids) / 4) <= len(ids) * 0.1 for s in shards)  # ids made together alternate
    shuffled = digits_dataset.shuffle(seed=3).values("id")
    assert [i for i in shuffled if sharding.shard_of(i, 4) == 1] != shards[1]  # another order ...
    assert sorted(i for i in shuffled if sharding.shard_of(i, 4) == 1) == sorted(shards[1])  # ... same samples
    for shard, n in ((4, 4), (-1, 4), (0, 0), (None, 2), (1, None)):
        with pytest.raises(FairBalanceError):
            sharding.validate_shard(shard, n)


def test_shards_in_one_process_equal_single_run_and_record_only_after_merge(digits_copy, sa_kwargs):
    single = compute_sa_features(digits_copy, embeddings_field="emb_single", features_field="sa_single",
                                 run_key="single", **sa_kwargs)
    kw = dict(embeddings_field="emb_sharded", features_field="sa_sharded", run_key="sharded", chunk_size=16,
              **sa_kwargs)
    import fiftyone as fo

    class Crash(Exception):
        pass

    def crash_after_a_chunk(pb):
        if digits_copy.has_field("sa_sharded") and len(digits_copy.exists("sa_sharded")):
            raise Crash()

    with pytest.raises(Crash):  # shard 2 dies after its first chunk; it resumes below
        compute_sa_features(digits_copy, shard=2, num_shards=4, progress=fo.report_progress(crash_after_a_chunk, dt=0.0),
                            **kw)
    assert 0 < len(digits_copy.exists("sa_sharded")) < len(digits_copy) / 4
    results = []
    for shard in (2, 0, 3, 1):  # any order
        assert "sharded" not in runs.list_runs(digits_copy, "sa_features")  # no complete record before the merge
        results.append(compute_sa_features(digits_copy, shard=shard, num_shards=4, **kw))
        if shard != 1:  # pending record: owns the field, is not a sa_features run
            assert runs.get_run_config(digits_copy, "sharded")["status"] == "running"
    assert [r.merged for r in results] == [False, False, False, True]
    assert sum(r.num_samples for r in results) == len(digits_copy)
    cfg = runs.get_run_config(digits_copy, "sharded")
    assert cfg["num_shards"] == 4 and cfg["model"]["model"] == sa_kwargs["model"] and "status" not in cfg
    merged = runs.load_run_results(digits_copy, "sharded")
    assert merged["related_texts"] == single.related_texts and merged["num_samples"] == len(digits_copy)
    assert merged["num_encoded"] == len(digits_copy)  # the crashed attempt's chunk counted once, not lost
    a, b = _features(digits_copy, "sa_single"), _features(digits_copy, "sa_sharded")
    assert a.keys() == b.keys() and all(np.allclose(a[i], b[i], atol=1e-5) for i in a)
    # a shard run again does nothing (everything done), and the run stays complete
    again = compute_sa_features(digits_copy, shard=0, num_shards=4, **kw)
    assert again.num_processed == 0 and again.num_resumed == again.num_samples
    # a shard with other settings, or another split, is refused before anything is written
    with pytest.raises(FairBalanceError, match="num_shards"):
        compute_sa_features(digits_copy, shard=0, num_shards=3, **kw)
    with pytest.raises(FairBalanceError, match="overwrite"):
        compute_sa_features(digits_copy, shard=0, num_shards=4, overwrite=True, **kw)
    # a non-sharded run cannot take the key; deleting the run deletes its field and its job state
    with pytest.raises(FairBalanceError, match="already exists"):
        compute_sa_features(digits_copy, **kw)
    runs.delete_run(digits_copy, "sharded")
    assert sharding.get_job(digits_copy, "sharded") is None and not digits_copy.has_field("sa_sharded")


def test_queue_sharded_validates_before_queuing(digits_copy, sa_kwargs):
    import fiftyone.operators.delegated as food

    svc = food.DelegatedOperationService()
    before = len(svc.list_operations(dataset_name=digits_copy.name))
    with pytest.raises(FairBalanceError, match="cannot be sharded"):
        fairbalance.queue_sharded(digits_copy, "train_classifier", num_shards=2)
    with pytest.raises(FairBalanceError, match="prompt_template"):
        fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2, prompt_template="x", **sa_kwargs)
    with pytest.raises(FairBalanceError, match="does not take"):
        fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2, shard=1, **sa_kwargs)
    with pytest.raises(FairBalanceError, match="num_shards"):
        fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=0, **sa_kwargs)
    assert len(svc.list_operations(dataset_name=digits_copy.name)) == before
    assert not digits_copy.has_run("sa_features")


def test_follow_up_clusters_all_features_once_after_the_merge_and_resumes(digits_copy, sa_kwargs):
    """queue_sharded(then=...): X-means on all the merged features, run by the merging process; a follow-up
    whose process died is run again over its own half-made run; bad follow-ups are refused before queuing."""
    import fiftyone.operators.delegated as food

    kw = dict(embeddings_field="emb_then", features_field="sa_then", **sa_kwargs)
    with pytest.raises(FairBalanceError, match="cannot be followed by 'train_classifier'"):
        fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2, then="train_classifier", **kw)
    with pytest.raises(FairBalanceError, match="does not take"):
        fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2,
                                  then=("compute_pseudo_labels", {"k": 3}), **kw)
    digits_copy.register_run("taken", digits_copy.init_run(), overwrite=True)
    with pytest.raises(FairBalanceError, match="'taken', which exists"):
        fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2,
                                  then=("compute_pseudo_labels", {"run_key": "taken"}), **kw)
    assert sharding.get_job(digits_copy, "sa_features") is None  # nothing queued or created

    then = ("compute_pseudo_labels", {"label_field": "cl_then", "run_key": "cl_then", "kmax": 6})
    job = fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2, run_key="sa_then", then=then,
                                    **kw)
    assert len(job.queued) == 2 and not digits_copy.has_field("cl_then")
    food.DelegatedOperationService().execute_queued_operations(operator=sharding.OPERATOR_URI,
                                                              dataset_name=digits_copy.name)
    digits_copy.reload()
    status = fairbalance.sharded_status(digits_copy, "sa_then")
    assert status["merged"] and [t["state"] for t in status["then"]] == ["done"]
    assert status["then"][0]["result"]["label_field"] == "cl_then"
    cfg = runs.get_run_config(digits_copy, "cl_then")
    assert cfg["features_field"] == "sa_then" and cfg["kmax"] == 6  # features inherited from the job
    # the same clustering as running it by hand on the merged features
    by_hand = compute_pseudo_labels(digits_copy, features_field="sa_then", label_field="cl_hand", run_key="cl_hand",
                                    kmax=6)
    assert digits_copy.values("cl_then.label") == digits_copy.values("cl_hand.label")
    assert status["then"][0]["result"]["counts"] == by_hand.counts

    # the merging process died inside the follow-up: its state says started, its run half-made
    sharding._collection().update_one({"_id": sharding.get_job(digits_copy, "sa_then")["_id"]},
                                      {"$set": {"then.0.state": "started"}})
    digits_copy.set_values("cl_then", [None] * len(digits_copy))
    again = fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2, run_key="sa_then",
                                      then=then, **kw)
    assert again.queued == {} and again.merge_queued  # a merge operation runs what is left
    food.DelegatedOperationService().execute_queued_operations(operator=sharding.OPERATOR_URI,
                                                              dataset_name=digits_copy.name)
    digits_copy.reload()
    assert fairbalance.sharded_status(digits_copy, "sa_then")["then"][0]["state"] == "done"
    assert digits_copy.values("cl_then.label") == digits_copy.values("cl_hand.label")
    done = fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2, run_key="sa_then",
                                     then=then, **kw)
    assert done.queued == {} and done.merge_queued is None
    with pytest.raises(FairBalanceError, match="follow-ups"):  # the job's follow-ups are part of its settings
        fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2, run_key="sa_then",
                                  then="compute_pseudo_labels", **kw)
    # overwrite=True replaces the job with its own follow-up run (every check before anything is deleted)
    replaced = fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2, run_key="sa_then",
                                         then=then, overwrite=True, **kw)
    assert len(replaced.queued) == 2 and not digits_copy.has_field("cl_then")
    food.DelegatedOperationService().execute_queued_operations(operator=sharding.OPERATOR_URI,
                                                              dataset_name=digits_copy.name)
    digits_copy.reload()
    assert fairbalance.sharded_status(digits_copy, "sa_then")["then"][0]["state"] == "done"
    assert digits_copy.values("cl_then.label") == digits_copy.values("cl_hand.label")


def test_overwrite_fails_the_replaced_jobs_queued_operations(digits_copy, sa_kwargs):
    """A job replaced while its shards wait in the queue: they are marked FAILED, and one of its operations that
    runs anyway (its token is the old job's) does nothing; the new job's settings are what get computed."""
    import fiftyone.operators as foo
    import fiftyone.operators.delegated as food
    from bson import ObjectId
    from fiftyone.operators.executor import ExecutionRunState

    kw = dict(embeddings_field="emb_o", features_field="sa_o", run_key="sa_o", **sa_kwargs)
    old = fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2, prompt_template="a {}", **kw)
    old_token = sharding.get_job(digits_copy, "sa_o")["token"]
    new = fairbalance.queue_sharded(digits_copy, "compute_sa_features", num_shards=2, overwrite=True, **kw)
    svc = food.DelegatedOperationService()
    assert all(svc.get(ObjectId(i)).run_state == ExecutionRunState.FAILED for i in old.queued.values())
    assert all(svc.get(ObjectId(i)).run_state == ExecutionRunState.QUEUED for i in new.queued.values())
    stale = foo.execute_operator(sharding.OPERATOR_URI, ctx={"dataset": digits_copy.name, "params": {
        "function": "compute_sa_features", "run_key": "sa_o", "num_shards": 2, "shard": 0, "job_token": old_token,
        "kwargs": {**{k: v for k, v in kw.items() if k != "run_key"}, "prompt_template": "a {}"}}})
    assert stale.error is None and "replaced" in stale.result["skipped"] and not digits_copy.has_field("sa_o")
    svc.execute_queued_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name)
    digits_copy.reload()
    assert fairbalance.sharded_status(digits_copy, "sa_o")["merged"]
    assert runs.get_run_config(digits_copy, "sa_o")["prompt_template"] == "a photo of a {}"


def _worker(log_path):
    """A real ``fiftyone delegated launch`` process with this session's database, plugin and library."""
    env = dict(os.environ)
    lib = os.path.dirname(os.path.dirname(fairbalance.__file__))  # this checkout's library, not an installed one
    env["PYTHONPATH"] = os.pathsep.join([lib] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log = open(log_path, "w")
    return subprocess.Popen([FIFTYONE_CLI, "delegated", "launch"], env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # the launcher's own way out (KeyboardInterrupt)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait(ds, predicate, what, timeout=600, logs=(), allowed_failures=()):
    """Poll the job's status until ``predicate(status)``; fail at once when a shard operation fails."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = fairbalance.sharded_status(ds, "sharded")
        failed = [s for s in status["shards"] if s["operation_state"] == "failed"
                  and s["operation"] not in allowed_failures]
        value = None if failed else predicate(status)
        if value or failed:
            break
        time.sleep(0.05)
    else:
        failed = "timed out"
    if value and not failed:
        return value
    tails = "\n".join(f"--- {p}\n" + open(p).read()[-3000:] for p in logs)
    raise AssertionError(f"waiting for {what}: {failed}\n{tails}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_run_four_shards_once_and_a_killed_shard_resumes(digits_copy, sa_kwargs, tmp_path):
    import fiftyone.operators.delegated as food
    from bson import ObjectId
    from fiftyone.operators.executor import ExecutionRunState

    ds = digits_copy
    reference = compute_sa_features(ds, embeddings_field="emb_single", features_field="sa_single", run_key="single",
                                    **sa_kwargs)
    kw = dict(embeddings_field="emb_sharded", features_field="sa_sharded", chunk_size=5, batch_size=5, **sa_kwargs)
    job = fairbalance.queue_sharded(ds, "compute_sa_features", num_shards=4, run_key="sharded", **kw)
    assert sorted(job.queued) == [0, 1, 2, 3] and not job.requeued
    svc = food.DelegatedOperationService()
    first_ops = dict(job.queued)
    # queuing again while they wait queues nothing twice
    assert fairbalance.queue_sharded(ds, "compute_sa_features", num_shards=4, run_key="sharded", **kw).queued == {}

    logs = [str(tmp_path / f"worker{i}.log") for i in range(3)]
    workers = []
    try:
        # one worker starts; killed (SIGKILL) in the middle of its first shard
        workers.append(_worker(logs[0]))

        def mid_shard(status):
            for s in status["shards"]:
                if s["state"] == "running" and s["total"] and 0 < s["done"] < s["total"] - 4:
                    return s
        victim = _wait(ds, mid_shard, "a shard in progress", logs=logs[:1])["shard"]
        workers[0].kill()
        workers[0].wait()
        status = fairbalance.sharded_status(ds, "sharded")
        killed = status["shards"][victim]
        assert killed["state"] == "running" and killed["done"] < killed["total"]  # killed mid-shard
        assert svc.get(ObjectId(first_ops[victim])).run_state == ExecutionRunState.RUNNING  # left RUNNING forever
        assert "sharded" not in runs.list_runs(ds, "sa_features") and not status["merged"]

        # queuing again resumes: the lost operation is marked FAILED and its shard queued again, once
        again = fairbalance.queue_sharded(ds, "compute_sa_features", num_shards=4, run_key="sharded", **kw)
        assert again.requeued == {victim: first_ops[victim]} and list(again.queued) == [victim]
        assert svc.get(ObjectId(first_ops[victim])).run_state == ExecutionRunState.FAILED

        workers += [_worker(logs[1]), _worker(logs[2])]
        # the merge lands inside the last shard's execution; its operation is marked completed just after
        _wait(ds, lambda status: status["merged"] and all(s["operation_state"] == "completed" for s in status["shards"]),
              "the merge and every shard's operation completed", logs=logs, allowed_failures=[first_ops[victim]])
    finally:
        for w in workers:
            _stop(w)

    status = fairbalance.sharded_status(ds, "sharded")
    assert status["shards_done"] == 4 and status["num_done"] == len(ds) and status["progress"] == 1.0
    ops = [op for op in svc.list_operations(dataset_name=ds.name) if op.operator == sharding.OPERATOR_URI]
    completed = [op for op in ops if op.run_state == ExecutionRunState.COMPLETED]
    shards_completed = sorted(op.context.request_params["params"]["shard"] for op in completed)
    assert shards_completed == [0, 1, 2, 3]  # each shard completed exactly once
    assert len(ops) == 5 and sum(op.run_state == ExecutionRunState.FAILED for op in ops) == 1
    for s in status["shards"]:
        assert s["attempts"] == (2 if s["shard"] == victim else 1)  # the others ran exactly once
    resumed = next(op for op in completed if op.context.request_params["params"]["shard"] == victim)
    assert 0 < resumed.result.result["num_resumed"] < resumed.result.result["num_samples"]  # resumed, not restarted

    # the result equals the single-process run: no duplicate or missing values, same features, same clusters
    ds.reload()
    assert len(ds) == 400 and len(ds.exists("sa_sharded")) == len(ds)
    a, b = _features(ds, "sa_single"), _features(ds, "sa_sharded")
    assert a.keys() == b.keys() and all(len(b[i]) == 5 and np.allclose(a[i], b[i], atol=1e-5) for i in a)
    cfg = runs.get_run_config(ds, "sharded")
    assert cfg["num_shards"] == 4 and cfg["fields_written"] == ["sa_sharded"]
    assert runs.load_run_results(ds, "sharded")["related_texts"] == reference.related_texts
    compute_pseudo_labels(ds, features_field="sa_single", label_field="cl_single", run_key="cl_single", kmax=6)
    compute_pseudo_labels(ds, features_field="sa_sharded", label_field="cl_sharded", run_key="cl_sharded", kmax=6)
    la, lb = ds.values("cl_single.label"), ds.values("cl_sharded.label")
    assert _same_partition(la, lb)
    # queuing the finished job again queues nothing
    done = fairbalance.queue_sharded(ds, "compute_sa_features", num_shards=4, run_key="sharded", **kw)
    assert done.queued == {} and done.merge_queued is None


def test_sa_form_with_shards_queues_them_and_a_worker_loop_finishes_the_run(digits_copy, tiny_clip):
    import fiftyone.operators as foo
    import fiftyone.operators.delegated as food

    view = digits_copy.match_tags("train")
    params = {"source": "texts", "related_texts": "a red digit, a blue digit, a green digit", "model": tiny_clip,
              "pretrained": "", "num_shards": 3, "run_key": "form_sharded", "features_field": "sa_form",
              "embeddings_field": "emb_form", "cluster_field": "form_cluster"}
    result = foo.execute_operator("@fairbalance/fairbalance/compute_sa_features",
                                  ctx={"dataset": digits_copy.name, "view": view, "params": params})
    assert result.error is None, result.error
    assert result.result["shards_queued"] == 3 and not digits_copy.has_field("sa_form")  # queued, not computed
    svc = food.DelegatedOperationService()
    queued = svc.list_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name, run_state="queued")
    assert sorted(op.label for op in queued) == [f"compute_sa_features 'form_sharded' shard {i}/3" for i in range(3)]
    svc.execute_queued_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name)  # a worker's loop
    digits_copy.reload()
    status = fairbalance.sharded_status(digits_copy, "form_sharded")
    assert status["merged"] and status["num_done"] == len(view) == status["num_samples"]
    assert len(view.exists("sa_form")) == len(view) and not len(digits_copy.match_tags("test").exists("sa_form"))
    assert runs.get_run_config(digits_copy, "form_sharded")["num_shards"] == 3
    # "Then cluster into": X-means on all the merged features, once, after the merge
    assert status["then"][0]["state"] == "done"
    assert runs.get_run_config(digits_copy, "pseudo_labels")["features_field"] == "sa_form"
    assert len(view.exists("form_cluster")) == len(view)


def test_panel_shows_the_progress_of_unfinished_sharded_runs(digits_copy, sa_kwargs):
    """The one overall view in the App: the Balance panel lists sharded runs not finished, with their progress."""
    from test_panel import _call, _panel_module

    rows = _panel_module()._sharded_rows
    kw = dict(embeddings_field="emb_p", features_field="sa_p", run_key="sa_p", chunk_size=64, **sa_kwargs)
    assert rows(digits_copy) == []
    done = [compute_sa_features(digits_copy, shard=s, num_shards=4, **kw) for s in (1, 3)]
    [row] = rows(digits_copy)
    n = sum(r.num_samples for r in done)
    assert row == {"run_key": "sa_p", "function": "compute_sa_features", "shards": "2 / 4",
                   "samples": f"{n} / {len(digits_copy)} ({100 * n / len(digits_copy):.0f}%)", "state": "done, new"}
    assert [j["run_key"] for j in sharding.list_jobs(digits_copy)] == ["sa_p"]
    _call(digits_copy, "on_click_refresh", state={"label_field": "color"})  # the panel's button runs
    for s in (0, 2):
        compute_sa_features(digits_copy, shard=s, num_shards=4, **kw)
    assert rows(digits_copy) == [] and len(sharding.list_jobs(digits_copy)) == 1  # finished: no longer shown
