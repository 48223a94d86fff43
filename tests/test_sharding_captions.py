"""Sharded, resumable captions: per-caption seeds make every shard write what one process would."""

import pytest
import torch

import fairbalance
import tiny_models
from fairbalance.core import runs, sharding
from fairbalance.generate.captions import TOP_P, RowSeededSampler, caption_seed, compute_captions
from fairbalance.core.validation import FairBalanceError


@pytest.fixture(scope="module")
def tiny_blip(model_dir):
    return tiny_models.build_blip(str(model_dir / "blip-shards"))


@pytest.fixture
def cap_kwargs(tiny_blip, one_thread):
    return dict(model=tiny_blip, num_captions=3, max_new_tokens=6, device="cpu")


def _captions(samples, field):
    ids, caps = samples.values(["id", field])
    return dict(zip(ids, caps))


def test_row_seeded_sampler_draws_from_the_top_p_distribution_one_stream_per_row():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])  # top-p 0.9 keeps the first three
    n = 3000
    scores = probs.log().expand(n, 4).clone()
    sampler = RowSeededSampler([caption_seed(0, "/img.png", k) for k in range(n)], "cpu", None, TOP_P, None)
    out = sampler(torch.zeros(n, 1, dtype=torch.long), scores)
    assert bool(((out == 0) | (out == float("-inf"))).all()) and bool(((out == 0).sum(1) == 1).all())  # one token
    freq = torch.bincount(out.argmax(1), minlength=4).float() / n
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert torch.allclose(freq, expected, atol=0.03), freq
    # row r's draw depends on its own stream only: the same seed alone, or with other rows, picks the same
    again = RowSeededSampler([caption_seed(0, "/img.png", 7)], "cpu", None, TOP_P, None)
    assert again(torch.zeros(1, 1, dtype=torch.long), scores[:1]).argmax() == out[7].argmax()
    assert caption_seed(0, "/img.png", 0) != caption_seed(1, "/img.png", 0) != caption_seed(0, "/img.png", 1)


def test_captions_do_not_depend_on_batch_batch_size_or_view_order(digits_copy, cap_kwargs):
    view = digits_copy.limit(8)
    compute_captions(view, batch_size=1, caption_field="cap_b1", run_key="b1", **cap_kwargs)
    compute_captions(view, batch_size=4, caption_field="cap_b4", run_key="b4", **cap_kwargs)
    shuffled = digits_copy.select(view.values("id")).shuffle(seed=5)  # other batch companions
    compute_captions(shuffled, batch_size=3, caption_field="cap_b3", run_key="b3", **cap_kwargs)
    b1, b4, b3 = (_captions(view, f) for f in ("cap_b1", "cap_b4", "cap_b3"))
    assert b1 == b4 == b3
    assert all(len(c) == 3 for c in b1.values()) and len({tuple(c) for c in b1.values()}) > 1
    compute_captions(view, batch_size=4, seed=1, caption_field="cap_seed1", run_key="seed1", **cap_kwargs)
    assert _captions(view, "cap_seed1") != b4  # the seed matters


def test_shards_in_any_order_equal_single_run_and_record_only_after_merge(digits_copy, cap_kwargs):
    view = digits_copy.limit(12)
    single = compute_captions(view, caption_field="cap_single", run_key="single", batch_size=4, **cap_kwargs)
    kw = dict(caption_field="cap_sharded", run_key="sharded", chunk_size=2, **cap_kwargs)
    results = []
    for shard, batch_size in ((2, 1), (0, 3), (1, 2)):  # any order, any batch size
        assert "sharded" not in runs.list_runs(digits_copy, "captions")  # no complete record before the merge
        results.append(compute_captions(view, shard=shard, num_shards=3, batch_size=batch_size, **kw))
    assert [r.merged for r in results] == [False, False, True]
    assert sum(r.num_samples for r in results) == len(view) and all(r.num_resumed == 0 for r in results)
    assert _captions(view, "cap_sharded") == _captions(view, "cap_single")
    cfg = runs.get_run_config(digits_copy, "sharded")
    assert cfg["num_shards"] == 3 and cfg["fields_written"] == ["cap_sharded"] and "status" not in cfg
    merged = runs.load_run_results(digits_copy, "sharded")
    assert merged == {**runs.load_run_results(digits_copy, "single"), "caption_field": "cap_sharded"}
    assert merged == results[-1].results and merged["num_samples"] == single.num_samples == len(view)
    assert not len(digits_copy.exists("cap_sharded")) - len(view)  # nothing outside the view
    again = compute_captions(view, shard=0, num_shards=3, **kw)  # everything done: nothing redone
    assert again.num_processed == 0 and again.num_resumed == again.num_samples
    with pytest.raises(FairBalanceError, match="overwrite"):
        compute_captions(view, shard=0, num_shards=3, overwrite=True, **kw)
    with pytest.raises(FairBalanceError, match="settings"):  # another seed: other captions, refused
        compute_captions(view, shard=0, num_shards=3, seed=4, **kw)


def test_a_shard_stopped_midway_resumes_where_it_stopped(digits_copy, cap_kwargs):
    view = digits_copy.limit(10)
    compute_captions(view, caption_field="cap_single", run_key="single", batch_size=5, **cap_kwargs)
    kw = dict(caption_field="cap_sharded", run_key="sharded", chunk_size=2, batch_size=1, **cap_kwargs)
    n0 = sum(sharding.shard_of(i, 2) == 0 for i in view.values("id"))
    assert n0 >= 4

    def stop_at_third_image(pb):  # like a worker killed while captioning its second chunk
        if pb.iteration >= 3:
            raise KeyboardInterrupt("stopped")

    with pytest.raises(KeyboardInterrupt):
        compute_captions(view, shard=0, num_shards=2, progress=stop_at_third_image, **kw)
    written = _captions(view.exists("cap_sharded"), "cap_sharded")
    assert len(written) == 2  # the first chunk only, written as it finished
    status = fairbalance.sharded_status(digits_copy, "sharded")
    assert status["shards"][0]["state"] == "running" and status["shards"][0]["done"] == 2 and not status["merged"]

    resumed = compute_captions(view, shard=0, num_shards=2, **kw)
    assert (resumed.num_resumed, resumed.num_processed, resumed.merged) == (2, n0 - 2, False)
    last = compute_captions(view, shard=1, num_shards=2, **kw)
    assert last.merged and last.results["num_samples"] == len(view)
    assert _captions(view, "cap_sharded") == _captions(view, "cap_single")
    assert fairbalance.sharded_status(digits_copy, "sharded")["shards"][0]["attempts"] == 2


def test_captions_form_with_shards_queues_them_and_a_worker_loop_finishes_the_run(digits_copy, tiny_blip, one_thread):
    import fiftyone.operators as foo
    import fiftyone.operators.delegated as food

    view = digits_copy.limit(6)
    svc = food.DelegatedOperationService()
    with pytest.raises(FairBalanceError, match="num_captions"):  # checked before anything is queued
        fairbalance.queue_sharded(view, "compute_captions", num_shards=2, model=tiny_blip, num_captions=0)
    assert not svc.list_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name)
    params = {"model": tiny_blip, "num_captions": 2, "batch_size": 4, "num_shards": 2, "run_key": "form_sharded",
              "caption_field": "cap_form"}
    result = foo.execute_operator("@fairbalance/fairbalance/compute_captions",
                                  ctx={"dataset": digits_copy.name, "view": view, "params": params})
    assert result.error is None, result.error
    assert result.result["shards_queued"] == 2 and not digits_copy.has_field("cap_form")  # queued, not computed
    queued = svc.list_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name, run_state="queued")
    assert sorted(op.label for op in queued) == [f"compute_captions 'form_sharded' shard {i}/2" for i in range(2)]
    svc.execute_queued_operations(operator=sharding.OPERATOR_URI, dataset_name=digits_copy.name)  # a worker's loop
    digits_copy.reload()
    assert fairbalance.sharded_status(digits_copy, "form_sharded")["merged"]
    assert runs.get_run_config(digits_copy, "form_sharded")["num_shards"] == 2
    compute_captions(view, model=tiny_blip, num_captions=2, caption_field="cap_sdk", run_key="sdk")
    assert _captions(view, "cap_form") == _captions(view, "cap_sdk")
    assert runs.load_run_results(digits_copy, "form_sharded")["num_samples"] == len(view)


@pytest.mark.slow  # a worker process imports fiftyone, torch and transformers: ~60 s on the loaded 2-core machine
def test_a_real_delegated_worker_runs_the_queued_caption_shards(digits_copy, tiny_blip, one_thread, tmp_path):
    """``fiftyone delegated launch`` in its own process runs the shards; the result equals one process's run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    view = digits_copy.limit(6)
    kw = dict(model=tiny_blip, num_captions=2, max_new_tokens=5, device="cpu")
    job = fairbalance.queue_sharded(view, "compute_captions", num_shards=2, run_key="sharded",
                                    caption_field="cap_sharded", **kw)
    assert sorted(job.queued) == [0, 1]
    env = dict(os.environ)
    lib = os.path.dirname(os.path.dirname(fairbalance.__file__))  # this checkout's library, not an installed one
    env["PYTHONPATH"] = os.pathsep.join([lib] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "fiftyone"), "delegated", "launch"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while not fairbalance.sharded_status(view, "sharded")["merged"]:
            failed = [s for s in fairbalance.sharded_status(view, "sharded")["shards"]
                      if s["operation_state"] == "failed"]
            assert not failed and time.time() < deadline, (failed, log_path.read_text()[-3000:])
            time.sleep(0.2)
    finally:
        worker.send_signal(signal.SIGINT)  # the launcher's own way out
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    digits_copy.reload()
    compute_captions(view, caption_field="cap_single", run_key="single", **kw)
    assert _captions(view, "cap_sharded") == _captions(view, "cap_single")
    assert runs.load_run_results(digits_copy, "sharded") == {**runs.load_run_results(digits_copy, "single"),
                                                             "caption_field": "cap_sharded"}
