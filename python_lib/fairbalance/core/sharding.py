"""Sharded, resumable runs on FiftyOne's delegated operation service.

A sharded run splits a view into ``num_shards`` deterministic shards (a
sample goes to shard ``int(sample_id, 16) % num_shards``: the same split in
every process, whatever the order of the view) and runs each shard as its own
delegated operation, so any number of ``fiftyone delegated launch`` workers
on any machines that reach the database share the work. Each shard processes
its samples in chunks and writes each chunk in bulk as it finishes; a rerun
of a shard skips the samples already done for this run (resume, not restart).

The job's state lives in one document per run (``fairbalance_shards``
collection of FiftyOne's database; updates are atomic): its settings, the
view's digest, each shard's state, counters and delegated operation. While it
runs the dataset holds a *pending* run record (method ``sharded_job``: it owns
the output fields, so no other run takes them, and ``list_runs(samples,
method)`` never returns it); the last shard to finish merges (under the run
key's claim): it replaces the pending record by the complete run record (full
config + ``num_shards``) and its results. ``queue_sharded`` called again
resumes: it queues only unfinished shards (a RUNNING operation whose shard
claim has no live holder, i.e. its worker died, is marked FAILED first, as
``fiftyone delegated fail`` would, then its shard is queued again), or the merge.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import inspect
import json
import os
from dataclasses import asdict, dataclass

from fairbalance.core import claims, runs, validation
from fairbalance.core.jobs import COLLECTION, delete_job, get_job  # noqa: F401  (the job documents' store)
from fairbalance.core.jobs import collection as _collection
from fairbalance.core.jobs import job_id as _job_id  # noqa: F401
from fairbalance.core.capabilities import SHARDABLE, Shardable, parameter_default  # noqa: F401  (the table is in capabilities)
from fairbalance.core.shards import (  # noqa: F401  (also sharding.<name>: the shards, their job and merge)
    DEFAULT_CHUNK_SIZE, PENDING_METHOD, Shard, ShardResult, follow_ups_done, merge, one_shard_requested, shard_of,
    shardable, split, validate_shard, view_digest)
from fairbalance.core.shards import ensure_job as _ensure_job

OPERATOR_URI = "@fairbalance/fairbalance/compute_shard"
# a RUNNING shard operation with no claim at all for this long is taken as lost (a shard claims before its main work,
# but after loading its model: large models on slow storage take minutes)
ORPHAN_AFTER_S = 900.0


# settings that may differ between shards (they do not change the results)
RUNTIME_KWARGS = ("device", "num_workers", "batch_size", "progress", "chunk_size")


def _jsonable_kwargs(kwargs: dict) -> dict:
    out = runs.jsonable({k: v for k, v in kwargs.items() if k not in RUNTIME_KWARGS})
    json.dumps(out)
    return out


def _check_follow_ups(samples, spec: Shardable, function: str, then) -> list[dict]:
    """``then`` as a list of ``{"function", "kwargs"}``, checked before anything is queued."""
    if then is None:
        return []
    items = [then] if isinstance(then, (str, dict)) or (
        isinstance(then, (list, tuple)) and len(then) == 2 and isinstance(then[0], str) and isinstance(then[1], dict)
    ) else list(then)
    out = []
    for item in items:
        if isinstance(item, str):
            name, kwargs = item, {}
        elif isinstance(item, dict):
            name, kwargs = item.get("function"), dict(item.get("kwargs") or {})
        else:
            name, kwargs = item[0], dict(item[1] or {})
        if name not in spec.then:
            raise validation.FairBalanceError(
                f"{function} cannot be followed by {name!r}; it can be followed by: {', '.join(sorted(spec.then)) or 'nothing'}")
        module, fn_name = spec.then[name][0].split(":")
        params = inspect.signature(getattr(importlib.import_module(module), fn_name)).parameters
        unknown = sorted((set(kwargs) - set(params)) | ({"samples", "progress"} & set(kwargs)))
        if unknown:
            raise validation.FairBalanceError(f"{name} does not take {', '.join(unknown)} here")
        try:
            json.dumps(kwargs)
        except TypeError as e:
            raise validation.FairBalanceError(f"the arguments of {name} must be JSON-serializable: {e}") from e
        key = kwargs.get("run_key", params["run_key"].default if "run_key" in params else None)
        if key is not None:
            runs.validate_run_key(key)
        out.append({"function": name, "kwargs": kwargs, "run_key": key})
    return out


def _follow_up_run_key(t: dict) -> str | None:
    """The run key a follow-up (``{"function", "kwargs"}``) writes."""
    for spec in SHARDABLE.values():
        if t["function"] in spec.then:
            module, name = spec.then[t["function"]][0].split(":")
            params = inspect.signature(getattr(importlib.import_module(module), name)).parameters
            return t["kwargs"].get("run_key", params["run_key"].default if "run_key" in params else None)
    return None


def _check_follow_up_runs_free(samples, follow_ups: list[dict], job: dict | None, ignore=()) -> None:
    """A follow-up must not take another run's key (its own, made by this job before, is fine; so are ``ignore``,
    the old job's follow-up runs that an overwrite deletes)."""
    started = {(t["function"], json.dumps(t["kwargs"], sort_keys=True)) for t in (job or {}).get("then", [])
               if t["state"] != "new"}
    for t in follow_ups:
        own = (t["function"], json.dumps(t["kwargs"], sort_keys=True)) in started or t["run_key"] in ignore
        if t["run_key"] and not own and samples._root_dataset.has_run(t["run_key"]) and not t["kwargs"].get(
                "overwrite"):
            raise validation.FairBalanceError(
                f"the follow-up {t['function']} would write run '{t['run_key']}', which exists: pass another "
                "run_key or overwrite=True in its arguments")


def _live_shard_claims(dataset, run_key: str) -> list[dict]:
    prefix = f"shard:{dataset._doc.id}:{run_key}:"
    return [c for c in claims.list_claims() if c["_id"].startswith(prefix)]


@dataclass
class ShardedJob:
    """What :func:`queue_sharded` queued: the run key and the delegated operation of each shard queued now."""

    run_key: str
    function: str
    num_shards: int
    queued: dict[int, str]  # shard -> delegated operation id
    requeued: dict[int, str]  # shard -> id of a lost operation marked FAILED and queued again
    merge_queued: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _queue_op(samples, params: dict) -> str:
    import fiftyone.operators as foo

    res = foo.execute_operator(OPERATOR_URI, ctx={"dataset": samples._root_dataset, "view": samples.view(),
                                                  "params": params}, request_delegation=True)
    if res.error:
        raise validation.FairBalanceError(f"could not queue {params}: {res.error_message or res.error}")
    return str(res.result["id"])


PATH_KWARGS = ("output_dir", "classifier", "model", "adapters", "base_model")


def _absolute_paths(kwargs: dict) -> dict:
    """Relative folder arguments made absolute: workers resolve paths in their own working directories."""
    out = dict(kwargs)
    for k in PATH_KWARGS:
        v = out.get(k)
        if isinstance(v, str) and v and not os.path.isabs(v) and (k == "output_dir" or os.path.exists(v)):
            out[k] = os.path.abspath(v)
    return out


def _fail_queued_operations(job: dict | None, why: str) -> None:
    """Mark the queued (not yet running) shard operations of a job FAILED, e.g. when the job is replaced."""
    if not job:
        return
    import fiftyone.operators.delegated as food
    from bson import ObjectId
    from fiftyone.operators.executor import ExecutionResult, ExecutionRunState

    svc = food.DelegatedOperationService()
    for state in job["shards"].values():
        op = svc.get(ObjectId(state["op_id"])) if state.get("op_id") else None
        if op is not None and op.run_state in (ExecutionRunState.QUEUED, ExecutionRunState.SCHEDULED):
            svc.set_failed(op.id, result=ExecutionResult(error=why))


def current_operation(samples, run_key: str, token: str | None) -> bool:
    """Whether an operation queued with ``token`` belongs to the job of ``run_key`` as it is now (not to a job
    that was replaced or deleted since it was queued)."""
    job = get_job(samples, run_key)
    return job is not None and (token is None or job.get("token") in (None, token))


def require_same_weights_everywhere(function: str, kwargs: dict) -> None:
    """Refuse a sharded job on a randomly initialised model (``pretrained`` empty and no model folder): each
    worker would draw other weights, and the merged features would mix incomparable spaces."""
    if "model" not in kwargs or kwargs.get("pretrained", "x") not in (None, ""):  # a CLIP-style (model, pretrained)
        return
    model = str(kwargs.get("model") or "")
    if not model.startswith(("local-dir:", "hf-hub:")):
        raise validation.FairBalanceError(
            f"{function} with model={model!r} and pretrained={kwargs['pretrained']!r} uses random weights, which "
            "differ in every worker: shards would not be comparable; give pretrained weights (a tag or a "
            "checkpoint file) or a model folder (model='local-dir:/path')")


def _job_run_key(arguments: dict) -> dict:
    """The run a ``queue_sharded`` call records: ``{run key: method}`` (checked first by :func:`runs.writer`)."""
    spec = shardable(arguments["function"])
    key = arguments["run_key"] or parameter_default(spec.function, "run_key")
    dataset = getattr(arguments["samples"], "_root_dataset", None)
    if dataset is not None and isinstance(key, str) and dataset.has_run(key):
        cfg = runs.get_run_config(dataset, key)
        if cfg.get("method") == runs.CONFIG_PREFIX + PENDING_METHOD and cfg.get("function") == arguments["function"]:
            return {key: PENDING_METHOD}  # this job's own pending record: the job resumes (or overwrite replaces it)
    return {key: spec.method}


@runs.writer(None, resumable=True, keys=_job_run_key, ignore_for_rerun=("num_shards",))  # its job resumes
def queue_sharded(samples, function: str, num_shards: int, run_key: str | None = None, overwrite: bool = False,
                  then=None, orphan_after_s: float = ORPHAN_AFTER_S, **kwargs) -> ShardedJob:
    """Queue ``function`` on ``samples`` as ``num_shards`` delegated operations (one per shard).

    Workers (``fiftyone delegated launch``, anywhere that reaches the
    database) run the shards; the last to finish merges them into one run
    record. Called again with the same arguments, it resumes: finished shards
    are skipped, queued or running ones left alone, failed ones and those of
    dead workers queued again (the latter marked FAILED first), and a job
    whose shards are all done but not merged gets a merge operation.
    ``overwrite=True`` deletes run ``run_key`` (and its fields) first.
    ``then``: what runs once on the merged result, in the merging process,
    e.g. ``"compute_pseudo_labels"`` or ``("compute_pseudo_labels",
    {"label_field": "sa_cluster"})`` (X-means on all the SA features; its
    ``features_field`` is the job's), or a list of those.
    ``kwargs`` are ``function``'s own (JSON-serializable) arguments.
    """
    spec = shardable(function)
    fn = spec.load()
    num_shards = validation.require_positive_int("num_shards", num_shards)
    validation.require_nonempty(samples)
    num_samples = validation.count_samples(samples)
    if num_shards > num_samples:
        raise validation.FairBalanceError(
            f"num_shards={num_shards} is more than the {num_samples} samples of the view: every shard needs "
            "work; use at most one shard per sample")
    params = inspect.signature(fn).parameters
    unknown = sorted((set(kwargs) - set(params)) | ({"shard", "num_shards", "progress", "samples"} & set(kwargs)))
    if unknown:
        raise validation.FairBalanceError(f"{function} does not take {', '.join(unknown)} here")
    run_key = run_key or params["run_key"].default
    runs.validate_run_key(run_key)
    kwargs = _absolute_paths(kwargs)
    try:
        jsonable = _jsonable_kwargs(kwargs)
        json.dumps(kwargs)
    except TypeError as e:
        raise validation.FairBalanceError(f"queue_sharded's arguments must be JSON-serializable: {e}") from e
    follow_ups = _check_follow_ups(samples, spec, function, then)
    require_same_weights_everywhere(function, {**{n: p.default for n, p in params.items()}, **kwargs})
    validator = getattr(importlib.import_module(spec.function.split(":")[0]), "validate_inputs", None)
    if validator is not None:
        validator(samples, **kwargs)  # the function's own up-front checks, before anything is queued
    dataset = samples._root_dataset
    dataset.reload()  # workers (other processes) replace run records: never judge from a stale copy
    old_job = get_job(samples, run_key)
    replacing = overwrite and (dataset.has_run(run_key) or old_job is not None)
    old_follow_up_runs = [_follow_up_run_key(t) for t in (old_job or {}).get("then", []) if t["state"] != "new"]
    # every check before anything is deleted (the old job's own follow-up runs go with it when replaced)
    _check_follow_up_runs_free(samples, follow_ups, old_job, ignore=old_follow_up_runs if replacing else ())
    if replacing:
        live = _live_shard_claims(dataset, run_key)
        if live:
            raise claims.ClaimError(f"Run '{run_key}' has {len(live)} shard(s) running; wait for them or stop "
                                    "their workers before overwriting")
        _fail_queued_operations(old_job, f"fairbalance: run '{run_key}' was replaced (queue_sharded overwrite=True)")
        if spec.delete:
            spec.load("delete")(samples, run_key)
        if dataset.has_run(run_key):
            runs.delete_run(dataset, run_key, cleanup=True)
        for key in old_follow_up_runs:
            if key and dataset.has_run(key):
                runs.delete_run(dataset, key, cleanup=True)
        delete_job(samples, run_key)
    ids = spec.job_ids(samples)
    job = _ensure_job(samples, run_key, function, num_shards, view_digest(ids), len(ids), spec.written(kwargs),
                      jsonable, [{"function": t["function"], "kwargs": t["kwargs"]} for t in follow_ups])
    base = {"function": function, "run_key": run_key, "num_shards": num_shards, "kwargs": kwargs,
            "job_token": job.get("token")}
    if job.get("merged"):  # done, or its follow-ups left to run (their process died): a merge operation runs them
        merge_op = None if follow_ups_done(job) else _queue_op(samples, {**base, "merge": True})
        return ShardedJob(run_key, function, num_shards, {}, {}, merge_op)
    queued, requeued = _queue_unfinished_shards(samples, job, base, run_key, orphan_after_s)
    merge_op = None
    if all(s["state"] == "done" for s in job["shards"].values()):
        merge_op = _queue_op(samples, {**base, "merge": True})
    return ShardedJob(run_key, function, num_shards, queued, requeued, merge_op)


def _queue_unfinished_shards(samples, job: dict, base: dict, run_key: str, orphan_after_s: float):
    """Queue every shard not done, not queued and not run by a live worker (a RUNNING operation whose worker is gone
    is marked FAILED first); the shards queued and those queued again (shard -> operation id)."""
    import fiftyone.operators.delegated as food
    from bson import ObjectId
    from fiftyone.operators.executor import ExecutionResult, ExecutionRunState

    svc = food.DelegatedOperationService()
    live = {c["_id"].rsplit(":", 1)[1] for c in _live_shard_claims(samples._root_dataset, run_key)}
    queued, requeued = {}, {}
    for key, state in sorted(job["shards"].items(), key=lambda kv: int(kv[0])):
        if state["state"] == "done" or key in live:  # done, or a live worker runs it now
            continue
        op = svc.get(ObjectId(state["op_id"])) if state.get("op_id") else None
        if op is not None and op.run_state in (ExecutionRunState.QUEUED, ExecutionRunState.SCHEDULED):
            continue
        if op is not None and op.run_state == ExecutionRunState.RUNNING:
            started = op.started_at or op.updated_at
            age = (_dt.datetime.utcnow() - started).total_seconds() if started else float("inf")
            if key in live or (state["state"] != "running" and age < orphan_after_s):
                continue  # a live worker runs it (or is just starting it)
            svc.set_failed(op.id, result=ExecutionResult(
                error=f"fairbalance: the worker running shard {key} of run '{run_key}' is gone (its claim has no "
                      "live holder); queue_sharded queued the shard again"), required_state=ExecutionRunState.RUNNING)
            requeued[int(key)] = str(op.id)
        op_id = _queue_op(samples, {**base, "shard": int(key)})
        _collection().update_one({"_id": job["_id"]}, {"$set": {f"shards.{key}.op_id": op_id,
                                                                 f"shards.{key}.state": "queued"}})
        queued[int(key)] = op_id
    return queued, requeued


def sharded_status(samples, run_key: str) -> dict:
    """The overall view of a sharded run: each shard's state, progress and delegated operation."""
    import fiftyone.operators.delegated as food
    from bson import ObjectId

    job = get_job(samples, run_key)
    if job is None:
        raise validation.FairBalanceError(f"No sharded run '{run_key}' on dataset '{samples._root_dataset.name}'")
    svc = food.DelegatedOperationService()
    shards = []
    for key, s in sorted(job["shards"].items(), key=lambda kv: int(kv[0])):
        op = svc.get(ObjectId(s["op_id"])) if s.get("op_id") else None
        op_state = str(getattr(op.run_state, "value", op.run_state)).lower() if op is not None else None
        state = s["state"]  # the shard's own record, refined by its operation's fate (a failed op is no "new")
        if state != "done" and op_state in ("failed", "queued", "scheduled"):
            state = "failed" if op_state == "failed" else ("queued" if state == "new" else state)
        shards.append({"shard": int(key), "state": state, "done": s.get("done", 0), "total": s.get("total"),
                       "attempts": s.get("attempts", 0), "operation": s.get("op_id"),
                       "operation_state": str(op.run_state) if op is not None else None,
                       "progress": (op.status or {}).get("progress") if op is not None and isinstance(
                           op.status, dict) else getattr(getattr(op, "status", None), "progress", None)})
    done = sum(s["done"] for s in shards)
    total = job.get("num_items", job["num_samples"])  # work items (planned images) when not samples
    return {"run_key": run_key, "function": job["function"], "num_shards": job["num_shards"],
            "num_samples": job["num_samples"], "num_items": total, "num_done": done,
            "progress": done / total if total else 1.0,
            "shards_done": sum(s["state"] == "done" for s in shards), "merged": bool(job.get("merged")),
            "shards": shards,
            "then": [{k: t.get(k) for k in ("function", "kwargs", "state", "error", "result")}
                     for t in job.get("then", [])]}


def list_jobs(samples, unfinished_only: bool = False) -> list[dict]:
    """The :func:`sharded_status` of every sharded run of the dataset, newest first; ``unfinished_only``:
    those not merged yet or with follow-ups left (what the Balance panel shows while they run)."""
    dataset = samples._root_dataset
    out = []
    for doc in _collection().find({"dataset_id": str(dataset._doc.id)}, {"run_key": 1, "merged": 1, "then": 1}
                                  ).sort("created", -1):
        if unfinished_only and doc.get("merged") and follow_ups_done(doc):
            continue
        out.append(sharded_status(samples, doc["run_key"]))
    return out
