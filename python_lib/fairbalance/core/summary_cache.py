"""Cached summaries of a view, valid while its dataset is unchanged.

A summary of 1M samples is a full pass over the samples (seconds), and the
Balance panel asks for one on every load and view change. A summary is kept
in FiftyOne's database (collection ``fairbalance_summaries``) under the
dataset, the view's stages and the arguments, with the dataset's *stamp*:
the newest sample ``last_modified_at`` (FiftyOne indexes it and sets it on
every sample edit), the dataset's ``last_deletion_at`` and its document's
``last_modified_at`` (schema, runs, info). A cached summary is used only
while the stamp is unchanged: the rule of FiftyOne's own summary fields.
Reading the stamp costs four indexed lookups (one counts the samples that
carry the newest time: a long ``set_values`` stamps all its batches with the
time it began). Writers on machines whose clocks lag behind may go unseen.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from typing import Any, Callable

COLLECTION = "fairbalance_summaries"
MAX_PER_DATASET = 64  # entries kept per dataset (the newest)
SETTLE_S = 1.0  # a stamp this close to now may still have writes landing in its millisecond: not cached


def _db():
    import fiftyone.core.odm as foo

    return foo.get_db_conn()


def stamp(samples) -> dict:
    """What changes whenever the samples, their fields or the dataset's runs change."""
    dataset = samples._root_dataset
    doc = _db().datasets.find_one({"_id": dataset._doc.id}, {"last_modified_at": 1, "last_deletion_at": 1}) or {}
    coll = dataset._sample_collection
    newest = list(coll.find({}, {"last_modified_at": 1, "_id": 0}).sort("last_modified_at", -1).limit(1))
    newest = newest[0].get("last_modified_at") if newest else None
    # FiftyOne stamps every batch of one set_values() with the time the call began: while a long write runs, the
    # newest time stays put and only the number of samples carrying it grows (an index count scan)
    at_newest = coll.count_documents({"last_modified_at": newest}) if newest else 0
    return {"dataset_modified": doc.get("last_modified_at"), "deleted": doc.get("last_deletion_at"),
            "samples_modified": newest, "samples_at_newest": at_newest}


def cache_key(samples, name: str, arguments: dict) -> str:
    """The key of a summary: dataset, the view's stages (serialized) and the summary's arguments."""
    dataset = samples._root_dataset
    # the stages without their per-instance ``_uuid``: the same view built again is the same key
    stages = [{k: v for k, v in stage.items() if k != "_uuid"} for stage in samples.view()._serialize()]
    spec = {"dataset": str(dataset._doc.id), "view": stages, "group_slice": getattr(samples, "group_slice", None),
            "name": name,
            "arguments": arguments}
    return hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _settled(st: dict) -> bool:
    now = _dt.datetime.utcnow()
    return all((now - v).total_seconds() > SETTLE_S for v in st.values() if isinstance(v, _dt.datetime))


def cached(samples, name: str, arguments: dict, compute: Callable[[], Any]) -> Any:
    """``compute()``, or its stored value when the dataset has not changed since it was stored.

    The value must survive a JSON round trip unchanged (else it is not
    stored); it is stored only if the dataset did not change while it was
    computed.
    """
    coll = _db()[COLLECTION]
    key = cache_key(samples, name, arguments)
    before = stamp(samples)
    doc = coll.find_one({"_id": key})
    if doc is not None and doc.get("stamp") == before:
        return json.loads(doc["value"])
    value = compute()
    try:
        text = json.dumps(value)
        storable = json.loads(text) == value
    except (TypeError, ValueError):
        storable = False
    if storable and stamp(samples) == before and _settled(before):
        dataset_id = str(samples._root_dataset._doc.id)
        coll.replace_one({"_id": key}, {"_id": key, "dataset_id": dataset_id, "name": name, "stamp": before,
                                        "value": text, "stored_at": _dt.datetime.utcnow()}, upsert=True)
        old = [d["_id"] for d in coll.find({"dataset_id": dataset_id}, {"_id": 1})
               .sort("stored_at", -1).skip(MAX_PER_DATASET)]
        if old:
            coll.delete_many({"_id": {"$in": old}})
    return value


def clear(dataset=None) -> int:
    """Forget the cached summaries (of ``dataset``, or all); returns how many."""
    query = {} if dataset is None else {"dataset_id": str(dataset._doc.id)}
    return _db()[COLLECTION].delete_many(query).deleted_count
