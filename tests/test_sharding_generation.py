"""Sharded generation and DiffInject: shards in any order equal one run (files, pixels, samples, record)."""

import os
import time

import numpy as np
import pytest
from PIL import Image

import fairbalance as fb
from fairbalance.core import runs, sharding
from fairbalance.generate.diffusion import train_conditional_diffusion
from fairbalance.generate.generation import generate_balanced
from fairbalance.core.validation import FairBalanceError

TINY = dict(image_size=16, block_out_channels=(16, 32), batch_size=32)
VOLATILE = {"_id", "id", "filepath", "created_at", "last_modified_at", "_dataset_id"}


@pytest.fixture(scope="module")
def digits():
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits("fb-shard-gen-tests", num_classes=3, train_per_class=10, test_per_class=2,
                                 conflict_ratio=0.2, image_size=16, persistent=False, overwrite=True)
    ds.match_tags("train").match({"bias_aligned": False}).tag_samples("bias_conflicting")
    yield ds
    ds.delete()


@pytest.fixture(scope="module")
def model(digits, tmp_path_factory, one_thread):
    folder = str(tmp_path_factory.mktemp("shard-gen") / "model")
    return train_conditional_diffusion(digits.match_tags("train"), "ground_truth", output_dir=folder, epochs=1,
                                       run_key="gen_model", **TINY)


@pytest.fixture
def pair(digits):
    """Two clones: one for the unsharded run, one for the shards."""
    a, b = digits.clone(), digits.clone()
    yield a, b
    a.delete()
    b.delete()


def _strip(value):
    """A sample's dict without ids (labels get new ones): what must be equal between two datasets."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    return value


def _generated(ds):
    """Every generated sample by file name: its fields (less ids, paths, times) and its pixels."""
    out = {}
    for s in ds.match_tags("generated").iter_samples():
        fields = _strip(s.to_dict())
        out[os.path.basename(s.filepath)] = (fields, np.asarray(Image.open(s.filepath)))
    return out


def _assert_same_runs(one, other, run_key):
    """Two datasets hold the same generated samples and the same run record.

    Pixels are compared up to the rounding of batched float math: a shard batches other images together than one
    run does, and a pixel near a rounding edge can land a level or two off (text-to-image failed exact equality
    once, on a clean clone with 2 xdist workers); another seed or prompt per image changes most pixels by far more.
    """
    a, b = _generated(one), _generated(other)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert a[name][0] == b[name][0], name
        diff = np.abs(a[name][1].astype(int) - b[name][1].astype(int))
        assert a[name][1].shape == b[name][1].shape and diff.max() <= 2 and (diff > 0).mean() < 0.01, \
            (name, int(diff.max()), float((diff > 0).mean()))
    skip = {"output_dir", "target_dataset", "started_at", "completed_at", "num_shards"}
    ca, cb = runs.get_run_config(one, run_key), runs.get_run_config(other, run_key)
    assert {k: v for k, v in ca.items() if k not in skip} == {k: v for k, v in cb.items() if k not in skip}
    assert cb["num_shards"] > 1 and cb["output_dir"] == os.path.dirname(next(iter(
        other.match_tags("generated").values("filepath"))))
    ra, rb = runs.load_run_results(one, run_key), runs.load_run_results(other, run_key)
    # the realism figure is measured by unsharded generate_balanced only (a sharded run's merge does not measure it)
    skip |= {"realism", "two_sample_accuracy", "realism_warning"}
    assert {k: v for k, v in ra.items() if k not in skip} == {k: v for k, v in rb.items() if k not in skip}
    assert rb.get("realism") is None
    assert set(one.get_field_schema(flat=True)) == set(other.get_field_schema(flat=True))


def test_generate_balanced_shards_equal_one_run_and_record_only_after_merge(pair, model, tmp_path):
    single_ds, ds = pair
    kw = dict(label_field="ground_truth", model=model.model_dir, per_class=3, num_inference_steps=2, batch_size=2)
    single = generate_balanced(single_ds, output_dir=str(tmp_path / "single"), **kw)
    assert single.num_added == 9
    results = []
    # the whole dataset: the generated samples join the view as shards finish (the job is keyed on the real ones)
    for shard in (2, 0, 1):
        assert "generate_balanced" not in runs.list_runs(ds, "generate_balanced")  # no record before the merge
        results.append(generate_balanced(ds, output_dir=str(tmp_path / "sharded"), shard=shard, num_shards=3,
                                         chunk_size=2, **kw))
        if shard != 1:
            assert runs.get_run_config(ds, "generate_balanced")["status"] == "running"  # the pending record
            with pytest.raises(FairBalanceError, match="sharded_job"):  # an unsharded run may not take the key
                generate_balanced(ds, output_dir=str(tmp_path / "sharded"), **kw)
    assert [r.merged for r in results] == [False, False, True]
    assert [r.num_samples for r in results] == [3, 3, 3] and all(r.num_resumed == 0 for r in results)
    assert results[-1].results["num_added"] == 9 and results[-1].results["added"] == single.added
    _assert_same_runs(single_ds, ds, "generate_balanced")
    status = fb.sharded_status(ds, "generate_balanced")
    assert status["num_items"] == 9 and status["num_done"] == 9 and status["progress"] == 1.0
    # a shard again, or the same run unsharded (it resumes the complete run), adds nothing; a shard may not overwrite
    again = generate_balanced(ds, output_dir=str(tmp_path / "sharded"), shard=0, num_shards=3, **kw)
    assert again.num_processed == 0 and len(ds.match_tags("generated")) == 9
    assert generate_balanced(ds, output_dir=str(tmp_path / "sharded"), **kw).num_added == 0
    with pytest.raises(FairBalanceError, match="overwrite"):
        generate_balanced(ds, output_dir=str(tmp_path / "sharded"), shard=0, num_shards=3, overwrite=True, **kw)
    with pytest.raises(FairBalanceError, match="own dataset"):
        generate_balanced(ds, output_dir=str(tmp_path / "x"), shard=0, num_shards=3, target_dataset="elsewhere",
                          run_key="g2", **kw)
    import fiftyone as fo

    assert "g2" not in ds.list_runs() and sharding.get_job(ds, "g2") is None and not fo.dataset_exists("elsewhere")


def test_a_job_queued_by_the_flat_layout_merges_in_the_subpackages(pair, model, tmp_path):
    """A job document records function names, plus one module path: the result class, which the flat layout
    (before the subpackages) spelled "fairbalance.generation:GenerationResult". Such a job still merges."""
    from fiftyone.core.odm import get_db_conn

    single_ds, ds = pair
    kw = dict(label_field="ground_truth", model=model.model_dir, per_class=2, num_inference_steps=2, batch_size=2,
              run_key="old_layout")
    single = generate_balanced(single_ds, output_dir=str(tmp_path / "single"), **kw)
    first = generate_balanced(ds, output_dir=str(tmp_path / "sharded"), shard=0, num_shards=2, **kw)
    job = sharding.get_job(ds, "old_layout")
    assert not first.merged and job["function"] == "generate_balanced"
    assert job["shared"]["plan"]["result_class"] == "GenerationResult"  # a name now, not a module path
    get_db_conn()[sharding.COLLECTION].update_one(
        {"_id": job["_id"]}, {"$set": {"shared.plan.result_class": "fairbalance.generation:GenerationResult"}})
    last = generate_balanced(ds, output_dir=str(tmp_path / "sharded"), shard=1, num_shards=2, **kw)
    assert last.merged and last.results["added"] == single.added
    _assert_same_runs(single_ds, ds, "old_layout")


class Interrupted(Exception):
    pass


def test_an_interrupted_shard_resumes_and_the_union_is_one_run(pair, model, tmp_path):
    single_ds, ds = pair
    kw = dict(label_field="ground_truth", model=model.model_dir, per_class=4, num_inference_steps=2, batch_size=2,
              run_key="gen")
    generate_balanced(single_ds, output_dir=str(tmp_path / "single"), **kw)

    def stop_after_first_chunk(pb):
        if pb.iteration >= 2:
            raise Interrupted

    with pytest.raises(Interrupted):  # shard 0 (6 images, chunks of 2) stops after its first chunk
        generate_balanced(ds, output_dir=str(tmp_path / "sharded"), shard=0, num_shards=2, chunk_size=2,
                          progress=stop_after_first_chunk, **kw)
    assert len(ds.match_tags("generated")) == 2 and "gen" not in runs.list_runs(ds, "generate_balanced")
    first = generate_balanced(ds, output_dir=str(tmp_path / "sharded"), shard=1, num_shards=2, chunk_size=2, **kw)
    assert not first.merged and sharding.get_job(ds, "gen")["shards"]["0"]["state"] == "running"
    resumed = generate_balanced(ds, output_dir=str(tmp_path / "sharded"), shard=0, num_shards=2, chunk_size=2, **kw)
    assert resumed.merged and resumed.num_resumed == 2 and resumed.num_processed == 4
    assert resumed.results["added"] == {c: 4 for c in resumed.results["planned"]}  # the job added all 12
    _assert_same_runs(single_ds, ds, "gen")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_inject_shards_equal_one_run(pair, model, tmp_path):
    single_ds, ds = pair
    kw = dict(model=model.model_dir, ratio=0.25, gamma=0.5, t_edit=500, t_boost=200, num_inference_steps=4,
              batch_size=2)
    single = fb.inject_bias_conflicting(single_ds.match_tags("train"), output_dir=str(tmp_path / "single"), **kw)
    assert single.num_added == 8
    results = [fb.inject_bias_conflicting(ds.match_tags("train"), output_dir=str(tmp_path / "sharded"), shard=s,
                                          num_shards=3, chunk_size=2, **kw) for s in (1, 2, 0)]
    assert [r.merged for r in results] == [False, False, True]
    assert sorted(r.num_samples for r in results) == [2, 3, 3]
    merged = results[-1].results
    assert merged["num_contents"] == single.num_contents and merged["label_from"] == "content"
    _assert_same_runs(single_ds, ds, "diffinject")
    # queued again with overwrite and another gamma: the old run's samples and images go first, a worker remakes them
    import fiftyone.operators.delegated as food

    out = str(tmp_path / "sharded")
    job = fb.queue_sharded(ds.match_tags("train"), "inject_bias_conflicting", num_shards=2, run_key="diffinject",
                           overwrite=True, output_dir=out, **{**kw, "gamma": 0.0})
    assert sorted(job.queued) == [0, 1] and not len(ds.match_tags("generated"))
    assert runs.get_run_config(ds, "diffinject")["status"] == "running"  # the new job's pending record
    assert not [f for f in os.listdir(out) if f.endswith(".png")]
    food.DelegatedOperationService().execute_queued_operations(operator=sharding.OPERATOR_URI, dataset_name=ds.name)
    ds.reload()
    assert sorted(ds.match_tags("generated").values("generation.gamma")) == [0.0] * 8
    assert runs.get_run_config(ds, "diffinject")["gamma"] == 0.0
    assert len([f for f in os.listdir(out) if not f.startswith(".")]) == 9  # + the manifest (owner files are hidden)
    # a bad input is refused by queue_sharded before anything is queued
    with pytest.raises(FairBalanceError, match="gamma"):
        fb.queue_sharded(ds.match_tags("train"), "inject_bias_conflicting", num_shards=2, run_key="bad",
                         **{**kw, "gamma": 2.0})
    assert sharding.get_job(ds, "bad") is None


def test_forms_with_shards_queue_them_and_a_worker_loop_finishes_the_runs(digits, model):
    import fiftyone.operators as foo
    import fiftyone.operators.delegated as food

    ds = digits.clone()
    try:
        svc = food.DelegatedOperationService()
        forms = {
            "generate_balanced": {"label_field": "ground_truth", "diffusion_run": "gen_model", "mode": "equal",
                                  "total": 6, "num_inference_steps": 2, "run_key": "gen_form"},
            "inject_bias_conflicting": {"label_field": "ground_truth", "diffusion_run": "gen_model", "ratio": 0.2,
                                        "t_edit": 500, "num_inference_steps": 4, "run_key": "inject_form"},
        }
        for name, params in forms.items():
            res = foo.execute_operator(f"@fairbalance/fairbalance/{name}", ctx={
                "dataset": ds.name, "view": ds.match_tags("train"),
                "params": {**params, "view_target": "CURRENT_VIEW", "num_shards": 2}})
            assert res.error is None, res.error
            assert res.result["shards_queued"] == 2 and not len(ds.match_tags("generated"))  # queued, not made
        queued = svc.list_operations(operator=sharding.OPERATOR_URI, dataset_name=ds.name, run_state="queued")
        assert sorted(op.label for op in queued) == sorted(
            [f"generate_balanced 'gen_form' shard {i}/2" for i in range(2)]
            + [f"inject_bias_conflicting 'inject_form' shard {i}/2" for i in range(2)])
        svc.execute_queued_operations(operator=sharding.OPERATOR_URI, dataset_name=ds.name)  # a worker's loop
        ds.reload()
        for key, n in (("gen_form", 6), ("inject_form", round(0.2 * len(ds.match_tags("train"))))):
            status = fb.sharded_status(ds, key)
            assert status["merged"] and status["num_done"] == status["num_items"] == n
            assert runs.load_run_results(ds, key)["num_added"] == n and runs.get_run_config(ds, key)["num_shards"] == 2
            assert len(ds.match({"generation.run_key": key})) == n
    finally:
        ds.delete()


def _shard_in_its_own_process(dataset_name, shard, kw, both_started, out):
    """One shard in its own process, as a delegated worker runs it; waits at ``both_started`` once it holds its
    claims. (Threads of one process cannot stand in: FiftyOne's in-memory sample registry is not thread-safe.)"""
    import traceback

    import fiftyone as fo

    def meet(pb):  # called first when the shard has claimed everything and written nothing
        if pb.iteration == 0 and not both_started.broken:
            both_started.wait()

    try:
        res = generate_balanced(fo.load_dataset(dataset_name), shard=shard, num_shards=2, progress=meet, **kw)
        out.put((shard, res.merged, None))
    except BaseException:  # reported in the test, with where it came from
        both_started.abort()
        out.put((shard, None, traceback.format_exc()))


@pytest.mark.slow  # two spawned processes, each importing torch and diffusers
@pytest.mark.timeout(600)
def test_shards_starting_at_once_share_the_folder_which_no_other_run_may_take(pair, model, tmp_path):
    import multiprocessing
    import queue
    import threading

    from fairbalance.core import claims

    _, ds = pair
    out = str(tmp_path / "sharded")
    kw = dict(label_field="ground_truth", model=model.model_dir, per_class=2, num_inference_steps=2, batch_size=2,
              output_dir=out, run_key="together")
    mp = multiprocessing.get_context("spawn")
    both_started, outcomes = mp.Barrier(2, timeout=240), mp.Queue()
    procs = [mp.Process(target=_shard_in_its_own_process, args=(ds.name, s, kw, both_started, outcomes))
             for s in (0, 1)]
    try:
        procs[0].start()
        # the second starts once the first holds its claims, so both run at once
        deadline = time.time() + 240
        while both_started.n_waiting < 1 and procs[0].is_alive() and time.time() < deadline:
            time.sleep(0.05)
        procs[1].start()
        results = {}
        for _ in procs:
            shard, merged, error = outcomes.get(timeout=300)
            assert error is None, error
            results[shard] = merged
    except queue.Empty:
        raise AssertionError("a shard process did not report within 5 minutes") from None
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    ds.reload()
    assert sorted(results.values()) == [False, True] and len(ds.match_tags("generated")) == 6
    assert runs.load_run_results(ds, "together")["num_added"] == 6

    # while a shard holds the folder, no other operation may write it, nor a shard of another job; and vice versa
    job = sharding._job_id(ds, "together")

    @claims.exclusive
    def hold(shared_by, then):
        claims.claim_folder(out, shared_by)
        return then()

    @claims.exclusive
    def take(shared_by=None):
        claims.claim_folder(out, shared_by)
        return True

    def in_thread(fn, *args):
        box = []
        t = threading.Thread(target=lambda: box.append(_outcome(fn, *args)))
        t.start()
        t.join()
        return box[0]

    assert hold(f"{job}|0", lambda: in_thread(take, f"{job}|1")) is True  # the same job's shards share it
    assert isinstance(hold(f"{job}|0", lambda: in_thread(take)), claims.ClaimError)
    assert isinstance(hold(f"{job}|0", lambda: in_thread(take, "other:job|0")), claims.ClaimError)
    assert isinstance(hold(None, lambda: in_thread(take, f"{job}|1")), claims.ClaimError)
    assert take() is True  # all released


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


@pytest.fixture(scope="module")
def tiny_sd(model_dir):
    import tiny_models

    return tiny_models.build_stable_diffusion(str(model_dir / "sd-shard-t2i"))


def test_text_to_image_shards_equal_one_run_and_the_form_queues_them(pair, tiny_sd, tmp_path, one_thread):
    import fiftyone.operators as foo
    import fiftyone.operators.delegated as food

    from fairbalance.generate.text_to_image import generate_from_captions

    single_ds, ds = pair
    captions = [["a red digit zero"], ["a green digit", "a blue digit"], [], ["a white digit"]]
    for d in pair:
        d.limit(4).set_values("filtered_captions", captions)
    kw = dict(model=tiny_sd, num_inference_steps=2, height=16, width=16, device="cpu", safety_checker=False,
              batch_size=3)
    single = generate_from_captions(single_ds.limit(4), output_dir=str(tmp_path / "single"), **kw)
    assert single.num_added == 4
    results = [generate_from_captions(ds.limit(4), output_dir=str(tmp_path / "sharded"), shard=s, num_shards=2,
                                      chunk_size=1, **kw) for s in (1, 0)]
    assert [r.merged for r in results] == [False, True] and [r.num_samples for r in results] == [2, 2]
    _assert_same_runs(single_ds, ds, "text_to_image")

    res = foo.execute_operator("@fairbalance/fairbalance/generate_from_captions", ctx={
        "dataset": ds.name, "view": ds.limit(4), "params": {
            "caption_field": "filtered_captions", "label_field": "ground_truth", "model": tiny_sd,
            "num_inference_steps": 2, "safety_checker": False, "seed": 1, "run_key": "t2i_form", "num_shards": 2,
            "view_target": "CURRENT_VIEW"}})
    assert res.error is None, res.error
    assert res.result["shards_queued"] == 2 and not len(ds.match({"generation.run_key": "t2i_form"}))
    food.DelegatedOperationService().execute_queued_operations(operator=sharding.OPERATOR_URI, dataset_name=ds.name)
    ds.reload()
    assert fb.sharded_status(ds, "t2i_form")["merged"] and len(ds.match({"generation.run_key": "t2i_form"})) == 4


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_per_group_lora_shards_equal_one_run(pair, digits, tmp_path_factory, one_thread):
    import warnings

    pytest.importorskip("peft")
    train = digits.match_tags("train")
    base = train_conditional_diffusion(train, "ground_truth", attribute_field="color", epochs=1, run_key="cells_base",
                                       output_dir=str(tmp_path_factory.mktemp("cells") / "model"), **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cells of few images are warned about
        adapters = fb.finetune_per_group(train, group_field=["ground_truth", "color"], base_model=base, rank=2,
                                         steps=2, lr=1e-2, output_dir=str(tmp_path_factory.mktemp("ad") / "cells"),
                                         run_key="cells_adapters")
    single_ds, ds = pair
    out = tmp_path_factory.mktemp("per-group")
    kw = dict(adapters=adapters.output_dir, mode="equal", per_group=2, num_inference_steps=2, batch_size=3)
    single = fb.generate_per_group(single_ds.match_tags("train"), output_dir=str(out / "single"), **kw)
    results = [fb.generate_per_group(ds.match_tags("train"), output_dir=str(out / "sharded"), shard=s, num_shards=3,
                                     chunk_size=2, **kw) for s in (0, 2, 1)]
    assert [r.merged for r in results] == [False, False, True]
    assert results[-1].results["added"] == single.added and single.num_added == sum(r.num_samples for r in results)
    _assert_same_runs(single_ds, ds, "generate_per_group")
    # the form with Shards queues them; a worker loop makes them and merges
    import fiftyone.operators as foo
    import fiftyone.operators.delegated as food

    form_ds = digits.clone()  # holds the fine-tuning run the form names
    try:
        res = foo.execute_operator("@fairbalance/fairbalance/generate_per_group", ctx={
            "dataset": form_ds.name, "view": form_ds.match_tags("train"), "params": {
                "finetune_run": "cells_adapters", "mode": "equal", "per_group": 1, "num_inference_steps": 2,
                "run_key": "per_group_form", "num_shards": 2, "view_target": "CURRENT_VIEW"}})
        assert res.error is None, res.error
        assert res.result["shards_queued"] == 2 and not len(form_ds.match_tags("generated"))
        food.DelegatedOperationService().execute_queued_operations(operator=sharding.OPERATOR_URI,
                                                                   dataset_name=form_ds.name)
        form_ds.reload()
        n = len(single.planned)
        assert fb.sharded_status(form_ds, "per_group_form")["merged"] and len(form_ds.match_tags("generated")) == n
    finally:
        form_ds.delete()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_real_workers_make_the_shards_of_a_queued_generation(digits, model, tmp_path):
    """Two ``fiftyone delegated launch`` processes run the shards at once: one folder, one dataset, one record."""
    import fiftyone.operators.delegated as food
    from fiftyone.operators.executor import ExecutionRunState
    from test_sharding import _stop, _worker

    ds = digits.clone()
    logs = [str(tmp_path / f"worker{i}.log") for i in range(2)]
    workers = []
    try:
        kw = dict(label_field="ground_truth", model=model.model_dir, per_class=4, num_inference_steps=2,
                  batch_size=2, chunk_size=2, output_dir=str(tmp_path / "out"))
        job = fb.queue_sharded(ds, "generate_balanced", num_shards=2, run_key="workers", **kw)
        assert sorted(job.queued) == [0, 1]
        workers = [_worker(log) for log in logs]
        deadline = time.time() + 300
        while time.time() < deadline:
            status = fb.sharded_status(ds, "workers")
            # the merge lands inside the last shard's execution; its operation is marked completed just after
            if (status["merged"] and all(s["operation_state"] == "completed" for s in status["shards"])) \
                    or any(s["operation_state"] == "failed" for s in status["shards"]):
                break
            time.sleep(0.2)
    finally:
        for w in workers:
            _stop(w)
    try:
        tails = "\n".join(f"--- {p}\n" + open(p).read()[-3000:] for p in logs)
        assert status["merged"], (status, tails)
        ops = [op for op in food.DelegatedOperationService().list_operations(dataset_name=ds.name)
               if op.operator == sharding.OPERATOR_URI]
        assert sorted(op.context.request_params["params"]["shard"] for op in ops
                      if op.run_state == ExecutionRunState.COMPLETED) == [0, 1]
        ds.reload()
        gen = ds.match_tags("generated")
        assert len(gen) == 12 and len(set(gen.values("filepath"))) == 12
        assert all(os.path.isfile(p) for p in gen.values("filepath"))
        assert runs.load_run_results(ds, "workers")["num_added"] == 12
        assert runs.get_run_config(ds, "workers")["num_shards"] == 2
    finally:
        ds.delete()
