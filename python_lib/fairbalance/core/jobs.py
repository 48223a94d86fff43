"""The job documents of sharded runs: one per run key, in the ``fairbalance_shards`` collection.

Kept apart from :mod:`fairbalance.core.shards` (which writes them) so that
:func:`fairbalance.core.runs.delete_run` can forget a run's job without
importing the sharding machinery (no import cycle).
"""

from __future__ import annotations

COLLECTION = "fairbalance_shards"


def collection():
    """The MongoDB collection of job documents (FiftyOne's database)."""
    import fiftyone.core.odm as foo

    return foo.get_db_conn()[COLLECTION]


def job_id(dataset, run_key: str) -> str:
    return f"{dataset._doc.id}:{run_key}"


def get_job(samples, run_key: str) -> dict | None:
    """The job document of a sharded run (None if there is none)."""
    return collection().find_one({"_id": job_id(samples._root_dataset, run_key)})


def delete_job(samples, run_key: str) -> None:
    """Forget a sharded job's state (its run record and fields are :func:`runs.delete_run`'s)."""
    collection().delete_one({"_id": job_id(samples._root_dataset, run_key)})
