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
import hashlib
import importlib
import inspect
import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from fairbalance.core import claims, runs, validation
from fairbalance.core.jobs import COLLECTION, delete_job, get_job  # noqa: F401  (the job documents' store)
from fairbalance.core.jobs import collection as _collection
from fairbalance.core.jobs import job_id as _job_id
from fairbalance.core.capabilities import SHARDABLE, Shardable, parameter_default  # noqa: F401  (the table is in capabilities)

PENDING_METHOD = "sharded_job"
OPERATOR_URI = "@fairbalance/fairbalance/compute_shard"
DEFAULT_CHUNK_SIZE = 1024
# a RUNNING shard operation with no claim at all for this long is taken as lost (a shard claims before its main work,
# but after loading its model: large models on slow storage take minutes)
ORPHAN_AFTER_S = 900.0


# settings that may differ between shards (they do not change the results)
RUNTIME_KWARGS = ("device", "num_workers", "batch_size", "progress", "chunk_size")


def shardable(function: str) -> Shardable:
    if function not in SHARDABLE:
        raise validation.FairBalanceError(
            f"{function!r} cannot be sharded; shardable functions: {', '.join(sorted(SHARDABLE))}")
    return SHARDABLE[function]


def shard_of(sample_id: str, num_shards: int) -> int:
    """The shard of a sample: its id (a 96-bit ObjectId) modulo ``num_shards``; ids made together alternate."""
    return int(sample_id, 16) % num_shards


def split(items: list, shard: int, num_shards: int) -> list:
    """Shard ``shard``'s part of an ordered work list (e.g. planned images): items ``shard, shard + n, ...``."""
    return list(items[shard::num_shards])


def validate_shard(shard, num_shards) -> tuple[int, int]:
    if shard is None or num_shards is None:
        raise validation.FairBalanceError("pass both shard and num_shards (shard in 0 .. num_shards-1)")
    num_shards = validation.require_positive_int("num_shards", num_shards)
    shard = validation.require_positive_int("shard", shard, minimum=0)
    if shard >= num_shards:
        raise validation.FairBalanceError(f"shard={shard} is out of range for num_shards={num_shards} "
                                          f"(0 .. {num_shards - 1})")
    return shard, num_shards


def one_shard_requested(shard, num_shards, overwrite: bool = False) -> bool:
    """Whether a call asks for one shard; if so, checked: both given, in range, and no ``overwrite``
    (other shards write the same run: delete it first or ``queue_sharded(..., overwrite=True)``)."""
    if shard is None and num_shards is None:
        return False
    validate_shard(shard, num_shards)
    if overwrite:
        raise validation.FairBalanceError(
            "a shard cannot overwrite its run (other shards write it too): delete the run first or "
            "queue_sharded(..., overwrite=True)")
    return True


def view_digest(ids) -> str:
    """A digest of the view's sample ids: every shard must split the same samples."""
    return hashlib.sha1("\n".join(sorted(ids)).encode()).hexdigest()


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def _shard_claim(dataset, run_key: str, shard: int) -> str:
    return f"shard:{dataset._doc.id}:{run_key}:{shard}"


def _jsonable_kwargs(kwargs: dict) -> dict:
    out = runs.jsonable({k: v for k, v in kwargs.items() if k not in RUNTIME_KWARGS})
    json.dumps(out)
    return out


def _register_pending(dataset, run_key: str, job: dict) -> None:
    if dataset.has_run(run_key):
        return
    cfg = dataset.init_run(method=runs.CONFIG_PREFIX + PENDING_METHOD, function=job["function"],
                           num_shards=job["num_shards"], fields_written=list(job["fields"]), status="running")
    dataset.register_run(run_key, cfg, overwrite=True, cleanup=False)


def _check_fields_free(dataset, run_key: str, fields: list[str]) -> None:
    owners = {f: key for key in runs.list_runs(dataset) for f in runs.get_run_config(dataset, key).get(
        "fields_written", [])}
    schema = dataset.get_field_schema()
    clash = [f for f in fields if f in schema and owners.get(f) != run_key]
    if clash:
        raise validation.FairBalanceError(
            f"Field(s) {', '.join(repr(f) for f in clash)} already exist and belong to another run (or to no "
            "fairbalance run); choose other field names")


def _ensure_job(samples, run_key: str, function: str, num_shards: int, digest: str, num_samples: int,
                fields: list[str], kwargs: dict | None, then: list[dict] | None = None) -> dict:
    """The job of ``run_key``, created (with its pending run record) if absent; settings must match."""
    from pymongo import ReturnDocument
    from pymongo.errors import DuplicateKeyError

    dataset = samples._root_dataset
    spec = shardable(function)
    job_id = _job_id(dataset, run_key)
    coll = _collection()
    job = coll.find_one({"_id": job_id})
    if job is None:
        if dataset.has_run(run_key):
            method = getattr(dataset.get_run_info(run_key).config, "method", None)
            raise validation.FairBalanceError(
                f"Run '{run_key}' already exists on dataset '{dataset.name}' (made by {method!r}); delete it, "
                "use another run key, or queue_sharded(..., overwrite=True)")
        for f in fields:
            validation.require_field_name(f)
        _check_fields_free(dataset, run_key, fields)
        doc = {"_id": job_id, "dataset_id": str(dataset._doc.id), "run_key": run_key, "function": function,
               "method": spec.method, "num_shards": num_shards, "digest": digest, "num_samples": num_samples,
               "kwargs": kwargs, "fields": fields, "config": None, "shared": {}, "merged": False,
               "token": uuid.uuid4().hex,  # in every operation queued for this job: a replaced job's ops do nothing
               "then": [{**t, "state": "new"} for t in then or []],
               "created": _now(),
               "shards": {str(i): {"state": "new", "attempts": 0, "done": 0, "total": None, "op_id": None}
                          for i in range(num_shards)}}
        try:
            coll.insert_one(doc)
            job = doc
        except DuplicateKeyError:
            job = coll.find_one({"_id": job_id})
    problems = []
    if job["function"] != function:
        problems.append(f"it runs {job['function']!r}")
    if list(job["fields"]) != list(fields):
        problems.append(f"it writes {job['fields']}")
    if job["num_shards"] != num_shards:
        problems.append(f"it has num_shards={job['num_shards']}")
    if job["digest"] != digest:
        problems.append(f"it was queued on another view ({job['num_samples']} samples, not {num_samples})")
    if kwargs is not None:
        if job.get("kwargs") is None:
            job = coll.find_one_and_update({"_id": job_id, "kwargs": None}, {"$set": {"kwargs": kwargs}},
                                           return_document=ReturnDocument.AFTER) or coll.find_one({"_id": job_id})
        differs = sorted(k for k in set(job["kwargs"]) | set(kwargs) if job["kwargs"].get(k) != kwargs.get(k))
        if differs:
            problems.append(f"its settings differ in: {', '.join(differs)}")
    if then is not None and [(t["function"], t["kwargs"]) for t in job.get("then", [])] != [
            (t["function"], t["kwargs"]) for t in then]:
        problems.append(f"its follow-ups (then) are {[(t['function'], t['kwargs']) for t in job.get('then', [])]}")
    if problems:
        raise validation.FairBalanceError(
            f"A sharded run '{run_key}' exists on dataset '{dataset.name}' and " + "; ".join(problems) +
            ": resume it with the same settings, or queue_sharded(..., overwrite=True) to replace it")
    _register_pending(dataset, run_key, job)
    return job


@dataclass
class ShardResult:
    """What one shard did; ``merged`` when this shard also finished the job (``results``: the run's)."""

    run_key: str
    shard: int
    num_shards: int
    num_samples: int  # samples of this shard
    num_processed: int  # done by this call
    num_resumed: int  # done before (skipped)
    failures: dict[str, str] = field(default_factory=dict)
    merged: bool = False
    results: dict | None = None
    num_left_out: int = 0  # samples of this shard the function does not process (``Shard(only=...)``)

    def to_dict(self) -> dict:
        return asdict(self)


class Shard:
    """One shard of a sharded run while it runs: its samples to do, chunk bookkeeping, then the merge."""

    def __init__(self, samples, run_key: str, function: str, shard: int, num_shards: int, config: dict,
                 fields: list[str], done_field: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 only=None, items: list[str] | None = None, done=None, num_items: int | None = None):
        """The shard's work: by default its samples of the view (``shard_of``), done when ``done_field`` is set;
        ``only``: the ids of the view the function processes (default: all), the others of the shard (e.g.
        unlabelled samples) are never in a chunk and count as done from the start.

        A function whose unit of work is not a sample (a planned image) gives
        its own ``items`` (keys, already split, e.g. with :func:`split`),
        ``done`` (the keys already done) and ``num_items`` (all shards').
        """
        self.samples, self.run_key, self.function = samples, run_key, function
        self.shard, self.num_shards = validate_shard(shard, num_shards)
        self.chunk_size = validation.require_positive_int("chunk_size", chunk_size)
        self.spec = shardable(function)
        dataset = samples._root_dataset
        runs.validate_run_key(run_key)
        claims.acquire(_shard_claim(dataset, run_key, self.shard),
                       f"Shard {self.shard}/{self.num_shards} of run '{run_key}' of dataset '{dataset.name}'")
        if (items is None) == (done_field is None):
            raise ValueError("pass done_field (the shard's samples) or items (its own work items)")
        ids = self.spec.job_ids(samples)
        self.job = _ensure_job(samples, run_key, function, self.num_shards, view_digest(ids), len(ids), list(fields),
                               None)
        self._id = self.job["_id"]
        from pymongo import ReturnDocument

        stored = self.job.get("config")
        config = runs.jsonable(config)
        if stored is None:
            self.job = _collection().find_one_and_update(
                {"_id": self._id, "config": None}, {"$set": {"config": config}},
                return_document=ReturnDocument.AFTER) or _collection().find_one({"_id": self._id})
            stored = self.job["config"]
        differs = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
        if differs:
            raise validation.FairBalanceError(
                f"Shard {self.shard} of run '{run_key}' runs with other settings than the shards before it "
                f"(differs in: {', '.join(differs)}); all shards of a run must use the same settings and model")
        self.config = config
        if items is None:
            mine = [i for i in ids if shard_of(i, self.num_shards) == self.shard]
            done = set(samples.exists(done_field).values("id")) if dataset.has_field(done_field) else set()
        else:
            mine, done = list(items), set(done or ())
            if num_items is not None and self.job.get("num_items") != num_items:
                self.job = _collection().find_one_and_update(
                    {"_id": self._id}, {"$set": {"num_items": int(num_items)}},
                    return_document=ReturnDocument.AFTER)
        self.total = len(mine)
        only = None if only is None else set(only)
        self.left_out = 0 if only is None else sum(i not in only for i in mine)
        self.todo = [i for i in mine if i not in done and (only is None or i in only)]
        self.resumed = self.total - self.left_out - len(self.todo)
        self.processed = 0
        self.failures: dict[str, str] = {}
        self._update({"state": "running", "total": self.total, "done": self.total - len(self.todo),
                      "host": socket.gethostname(),
                      "pid": os.getpid(), "started": _now()}, inc={"attempts": 1})

    @property
    def complete(self) -> bool:
        """The job was merged already: nothing left to do."""
        return bool(self.job.get("merged"))

    def _update(self, values: dict, inc: dict | None = None) -> dict:
        from pymongo import ReturnDocument

        update = {"$set": {f"shards.{self.shard}.{k}": v for k, v in values.items()}}
        if inc:
            update["$inc"] = {f"shards.{self.shard}.{k}": v for k, v in inc.items()}
        self.job = _collection().find_one_and_update({"_id": self._id}, update, return_document=ReturnDocument.AFTER)
        return self.job

    def shared(self, name: str, compute: Callable[[], Any]) -> Any:
        """A value every shard of the job must share (e.g. the chosen related texts): the first one stored wins."""
        from pymongo import ReturnDocument

        if name not in self.job.get("shared", {}):
            value = runs.jsonable(compute())
            self.job = _collection().find_one_and_update(
                {"_id": self._id, f"shared.{name}": {"$exists": False}}, {"$set": {f"shared.{name}": value}},
                return_document=ReturnDocument.AFTER) or _collection().find_one({"_id": self._id})
        return self.job["shared"][name]

    def chunks(self) -> Iterator[list[str]]:
        for start in range(0, len(self.todo), self.chunk_size):
            yield self.todo[start:start + self.chunk_size]

    def chunk_done(self, ids: list[str], failures: dict[str, str] | None = None, counts: dict | None = None) -> None:
        """Record a chunk whose results are written (its samples are skipped by a rerun); ``counts`` are added to
        the shard's ``counts`` with the chunk, so they survive a crash and a resume (unlike ``finish``'s summary)."""
        self.processed += len(ids)
        self.failures.update(failures or {})
        self._update({}, inc={"done": len(ids) - len(failures or {}),
                              **{f"counts.{k}": int(v) for k, v in (counts or {}).items()}})

    def finish(self, summary: dict | None = None) -> ShardResult:
        """Mark the shard done; the last shard to finish merges the job."""
        self._update({"state": "done", "finished": _now(), "failures": self.failures,
                      "summary": runs.jsonable(summary or {})})
        result = ShardResult(self.run_key, self.shard, self.num_shards, self.total, self.processed, self.resumed,
                             dict(self.failures), num_left_out=self.left_out)
        if all(s["state"] == "done" for s in self.job["shards"].values()):
            merged = merge(self.samples, self.run_key)
            if merged is not None:
                result.merged, result.results = True, merged
        return result


@claims.exclusive
def merge(samples, run_key: str) -> dict | None:
    """Merge a job whose shards are all done: the complete run record and its results.

    Runs under the run key's claim, so one process merges; None when
    another merges now or the job is not ready. Idempotent: a merged job
    returns its stored results.
    """
    dataset = samples._root_dataset
    job = get_job(samples, run_key)
    if job is None:
        raise validation.FairBalanceError(f"No sharded run '{run_key}' on dataset '{dataset.name}'")
    if not job.get("merged") and not all(s["state"] == "done" for s in job["shards"].values()):
        return None
    if job.get("merged") and follow_ups_done(job):
        return runs.load_run_results(dataset, run_key)
    try:
        claims.claim_run(dataset, run_key)
    except claims.ClaimError:
        return None
    job = get_job(samples, run_key)
    if job.get("merged"):
        _run_follow_ups(samples, job)
        return runs.load_run_results(dataset, run_key)
    dataset.reload()  # the pending record may have been (re)registered by another process
    spec = shardable(job["function"])
    results = spec.load("merge")(samples, job)
    run = runs.PreparedRun(samples, run_key, spec.method,
                           {**job["config"], "num_shards": job["num_shards"]}, list(job["fields"]), False)
    run.started = min(s["started"] for s in job["shards"].values()).replace(tzinfo=_dt.timezone.utc).isoformat()
    run.write(lambda: None)  # replaces the pending record: nothing more to write, the shards did
    run.save_results(results)
    _collection().update_one({"_id": job["_id"]}, {"$set": {"merged": True, "merged_at": _now()}})
    _run_follow_ups(samples, job)
    return runs.load_run_results(dataset, run_key)


def follow_ups_done(job: dict) -> bool:
    return all(t["state"] == "done" for t in job.get("then", []))


def _follow_up_kwargs(job: dict, t: dict) -> dict:
    """A follow-up's arguments: the user's, plus the parameters it takes from the job's config."""
    _, inherit = shardable(job["function"]).then[t["function"]]
    return {**{p: job["config"][key] for p, key in inherit.items()}, **t["kwargs"]}


def _run_follow_ups(samples, job: dict) -> None:
    """Run the job's follow-ups not done yet, in order (the merging process, under the run key's claim).

    A follow-up that was started but not finished (its process died)
    runs again with ``overwrite=True``: the run it began is its own.
    """
    spec = shardable(job["function"])
    for i, t in enumerate(job.get("then", [])):
        if t["state"] == "done":
            continue
        kwargs = _follow_up_kwargs(job, t)
        if t["state"] == "started":  # its process died inside it: what it began is its own
            kwargs["overwrite"] = True
        _collection().update_one({"_id": job["_id"]}, {"$set": {f"then.{i}.state": "started",
                                                                 f"then.{i}.started": _now()}})
        module, name = spec.then[t["function"]][0].split(":")
        try:
            result = getattr(importlib.import_module(module), name)(samples, **kwargs)
        except Exception as e:
            _collection().update_one({"_id": job["_id"]}, {"$set": {f"then.{i}.state": "failed",
                                                                     f"then.{i}.error": str(e)}})
            raise
        out = result.to_dict() if hasattr(result, "to_dict") else result
        _collection().update_one({"_id": job["_id"]}, {"$set": {f"then.{i}.state": "done", f"then.{i}.finished": _now(),
                                                                 f"then.{i}.result": runs.jsonable(out)}})


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
    import fiftyone.operators.delegated as food
    from bson import ObjectId
    from fiftyone.operators.executor import ExecutionResult, ExecutionRunState

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
    svc = food.DelegatedOperationService()
    live = {c["_id"].rsplit(":", 1)[1] for c in _live_shard_claims(dataset, run_key)}
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
    merge_op = None
    if all(s["state"] == "done" for s in job["shards"].values()):
        merge_op = _queue_op(samples, {**base, "merge": True})
    return ShardedJob(run_key, function, num_shards, queued, requeued, merge_op)


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
