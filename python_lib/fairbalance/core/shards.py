"""The shards of a sharded run: the split, the job document's settings, one shard while it runs, the merge.

Queueing a sharded run and its status: :mod:`fairbalance.core.sharding`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import os
import socket
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from fairbalance.core import claims, runs, validation
from fairbalance.core.capabilities import SHARDABLE, Shardable
from fairbalance.core.jobs import collection as _collection
from fairbalance.core.jobs import get_job
from fairbalance.core.jobs import job_id as _job_id

PENDING_METHOD = "sharded_job"
DEFAULT_CHUNK_SIZE = 1024


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


def ensure_job(samples, run_key: str, function: str, num_shards: int, digest: str, num_samples: int,
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
        self.job = ensure_job(samples, run_key, function, self.num_shards, view_digest(ids), len(ids), list(fields),
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
