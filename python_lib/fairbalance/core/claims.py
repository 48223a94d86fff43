"""Claims: a run key, a field or an output folder in use by a running operation is refused to others.

Two processes (two App users, two delegated workers, a notebook and a
worker) that write the same run, field or image folder would otherwise mix
their outputs. Each public writer runs inside :func:`exclusive`; while it
runs, the names it :func:`acquire`\\ s are claimed by one document each in the
``fairbalance_claims`` collection of FiftyOne's MongoDB database (the
document id is the name, so MongoDB's unique ``_id`` index decides who wins).
Claims are released when the writer returns or raises; a claim whose holder
died (kill -9, a lost machine) is taken over: on the same host when its
process no longer exists, anywhere when its heartbeat (refreshed every
``HEARTBEAT_S`` seconds) is older than ``STALE_AFTER_S``.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import functools
import os
import socket
import threading
import uuid

from fairbalance.core import validation

COLLECTION = "fairbalance_claims"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0

_current: contextvars.ContextVar["_Held | None"] = contextvars.ContextVar("fairbalance_claims", default=None)
_live_tokens: set[str] = set()  # the tokens of this process's operations that hold claims now


class ClaimError(validation.FairBalanceError):
    """The run key, field or folder is in use by another running operation."""


def _collection():
    """The claims collection, written with journaled acknowledgement: a claim released (or taken) before a
    mongod crash must stay released after its restart, not come back and block its own process."""
    import fiftyone.core.odm as foo
    from pymongo import WriteConcern

    return foo.get_db_conn()[COLLECTION].with_options(write_concern=WriteConcern(w=1, j=True))


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)  # MongoDB stores naive UTC


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _is_stale(doc: dict) -> bool:
    if doc.get("host") == socket.gethostname():
        pid = int(doc.get("pid", -1))
        if not _pid_alive(pid):
            return True
        if pid == os.getpid() and doc.get("token") not in _live_tokens:
            return True  # this process's own, from an operation that has ended (a release lost in a crash)
    beat = doc.get("heartbeat")
    return beat is None or (_now() - beat).total_seconds() > STALE_AFTER_S


class _Held:
    """The claims of one running operation, refreshed by a heartbeat thread until released."""

    def __init__(self):
        self.token = uuid.uuid4().hex
        self.names: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, name: str, what: str) -> None:
        from pymongo.errors import DuplicateKeyError

        if name in self.names:
            return
        coll = _collection()
        doc = {"_id": name, "token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
               "what": what, "started": _now(), "heartbeat": _now()}
        for _ in range(3):
            try:
                coll.insert_one(doc)
                break
            except DuplicateKeyError:
                holder = coll.find_one({"_id": name})
                if holder is None:
                    continue  # released meanwhile
                if _is_stale(holder):
                    coll.delete_one({"_id": name, "token": holder["token"]})
                    continue
                raise ClaimError(
                    f"{what} is in use by a running operation (process {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('started'):%Y-%m-%d %H:%M:%S} UTC); wait for it "
                    "to finish or use another run key / output folder") from None
        else:
            raise ClaimError(f"Could not claim {what}: it is being claimed and released repeatedly")
        self.names.append(name)
        _live_tokens.add(self.token)
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="fairbalance-claims", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                _collection().update_many({"_id": {"$in": list(self.names)}, "token": self.token},
                                          {"$set": {"heartbeat": _now()}})
            except Exception:  # a transient database error must not kill the operation
                pass

    def release(self) -> None:
        self._stop.set()
        _live_tokens.discard(self.token)
        if self.names:
            _collection().delete_many({"_id": {"$in": self.names}, "token": self.token})
            self.names = []


def exclusive(fn):
    """Run ``fn`` holding every claim it acquires; release them all when it returns or raises.

    Nested calls (a writer calling another writer) share the outermost
    scope, so their claims are released together.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _current.get() is not None:
            return fn(*args, **kwargs)
        held = _Held()
        token = _current.set(held)
        try:
            return fn(*args, **kwargs)
        finally:
            _current.reset(token)
            held.release()

    return wrapper


def acquire(name: str, what: str) -> None:
    """Claim ``name`` for the running operation, or raise :class:`ClaimError` when another holds it.

    Outside an :func:`exclusive` scope (e.g. an internal helper called on
    its own) nothing is claimed; under a launcher (``accelerate launch``,
    ``torchrun``) only the main process claims, for the whole job.
    """
    from fairbalance.core import distributed

    held = _current.get()
    if held is not None and distributed.is_main():
        held.acquire(name, what)


def claim_run(dataset, run_key: str) -> None:
    acquire(f"run:{dataset._doc.id}:{run_key}", f"Run '{run_key}' of dataset '{dataset.name}'")
    _refuse_if_rebuilt(dataset)


def claim_field(dataset, field: str) -> None:
    acquire(f"field:{dataset._doc.id}:{field}", f"Field '{field}' of dataset '{dataset.name}'")
    _refuse_if_rebuilt(dataset)


def claim_dataset_name(name: str) -> None:
    """Claim the dataset name ``name`` for a dataset builder that (re)creates it.

    Refused while another builder holds the name, or while any running
    operation holds a run or field of the dataset of that name: an
    ``overwrite=True`` rebuild must not delete a dataset under a running
    operation (and a writer starting during a rebuild is refused in turn,
    by :func:`claim_run` / :func:`claim_field`).
    """
    import fiftyone as fo

    acquire(f"dataset:{name}", f"Dataset '{name}'")
    held = _current.get()
    if held is None or not held.names or not fo.dataset_exists(name):
        return
    ds_id = fo.load_dataset(name)._doc.id
    busy = [c for prefix in (f"run:{ds_id}:", f"field:{ds_id}:") for c in _live(prefix)
            if c.get("token") != held.token]
    if busy:
        c = busy[0]
        raise ClaimError(f"Dataset '{name}' is in use by a running operation ({c.get('what')}: process "
                         f"{c.get('pid')} on {c.get('host')}); it is not rebuilt: wait for it to finish or "
                         "choose another name")


def _refuse_if_rebuilt(dataset) -> None:
    """A writer's claim on a dataset that a builder is rebuilding (deleting and recreating) now is refused."""
    held = _current.get()
    if held is None or not held.names:
        return
    name = f"dataset:{dataset.name}"
    holders = [c for c in _live(name) if c["_id"] == name and c.get("token") != held.token]  # exact name only
    if holders:
        raise ClaimError(f"Dataset '{dataset.name}' is being rebuilt by a running operation (process "
                         f"{holders[0].get('pid')} on {holders[0].get('host')}); wait for it to finish")


def claim_folder(folder: str, shared_by: str | None = None) -> None:
    """Claim an output folder: for this operation alone, or (``shared_by``: a sharded job's id) with its shards.

    The shards of one job write one folder at once: each claims
    ``dir:<folder>|<job>|<shard>``; the folder is then refused to any other
    operation (and to the shards of another job) while one of them runs,
    and to the shards while another operation holds it.
    """
    folder = os.path.realpath(folder)
    name, what = f"dir:{folder}", f"Output folder {folder}"
    held = _current.get()
    if shared_by is None:
        acquire(name, what)
        others = _live(name + "|")
    else:
        job, shard = shared_by.rsplit("|", 1) if "|" in shared_by else (shared_by, "")
        acquire(f"{name}|{job}|{shard}", f"{what} (shard {shard} of {job})")
        others = [c for c in _live(name) if c["_id"] == name
                  or (c["_id"].startswith(name + "|") and c["_id"].rsplit("|", 2)[-2] != job)]
    others = [c for c in others if held is None or c.get("token") != held.token]
    if others and held is not None and held.names:
        c = others[0]
        raise ClaimError(f"{what} is in use by a running operation ({c.get('what')}: process {c.get('pid')} on "
                         f"{c.get('host')}); wait for it to finish or use another output folder")


def _live(prefix: str) -> list[dict]:
    """The live claims whose name starts with ``prefix`` (those of dead holders are deleted on the way)."""
    import re

    coll = _collection()
    live = []
    for doc in coll.find({"_id": {"$regex": "^" + re.escape(prefix)}}):
        if _is_stale(doc):
            coll.delete_one({"_id": doc["_id"], "token": doc.get("token")})
        else:
            live.append(doc)
    return live


def list_claims() -> list[dict]:
    """The claims held now by live operations (for diagnosis: which operation holds what).

    Claims left by dead holders are deleted on the way.
    """
    coll = _collection()
    live = []
    for doc in coll.find({}):
        if _is_stale(doc):
            coll.delete_one({"_id": doc["_id"], "token": doc.get("token")})
        else:
            live.append(doc)
    return live
