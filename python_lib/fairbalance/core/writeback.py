"""Bulk write-back of computed values, keyed by sample id.

All values are validated (one per sample of the view, same ids) before the
first write, and each field is written with one ``set_values`` call, so a bad
input leaves the dataset as it was.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fairbalance.core import validation


def set_values_by_id(
    samples,
    values: Mapping[str, Mapping[str, Any]],
    ids: Sequence[str] | None = None,
    progress=None,
) -> None:
    """Write ``{field: {sample_id: value}}`` onto ``samples`` in bulk.

    ``ids`` (default: the ids of ``samples``) lists the samples that must
    receive a value for every field; extra or missing ids are an error before
    anything is written. Fields are created as needed by FiftyOne's type
    inference.
    """
    validation.require_nonempty(samples)
    expected = set(samples.values("id")) if ids is None else set(ids)
    for field_name, by_id in values.items():
        validation.require_field_name(field_name)
        got = set(by_id)
        if got != expected:
            missing = len(expected - got)
            extra = len(got - expected)
            raise validation.FairBalanceError(
                f"Values for '{field_name}' do not match the view: {missing} sample(s) missing, {extra} unknown id(s)"
            )
    dataset = samples._root_dataset
    existed = set(dataset.get_field_schema())
    written = []
    try:
        for field_name, by_id in values.items():
            written.append(field_name)
            samples.set_values(field_name, dict(by_id), key_field="id", progress=progress)
    except Exception as e:  # e.g. values of mixed types: leave no new, half-filled field behind
        for field_name in written:
            if field_name not in existed and dataset.has_sample_field(field_name):
                dataset.delete_sample_field(field_name)
        raise validation.FairBalanceError(f"Could not write '{written[-1]}': {e}") from e


def generation_target(samples, target_dataset, output_dir: str | None, run_key: str, shared_by: str | None = None):
    """Where generated samples go: ``(dataset, writable image folder)``.

    ``target_dataset``: None (the samples' own dataset), a dataset, or a name
    (loaded, or created persistent). The folder defaults to
    ``$FAIRBALANCE_DATA_DIR/generated/<dataset>/<run_key>``. The folder is
    claimed for this operation, or with ``shared_by`` (``"<job>|<shard>"``)
    shared by the shards of one sharded job (:func:`claims.claim_folder`).
    """
    import os

    import fiftyone as fo

    from fairbalance.core import folders

    target = target_dataset if target_dataset is not None else samples._root_dataset
    if isinstance(target, str):
        target = fo.load_dataset(target) if fo.dataset_exists(target) else fo.Dataset(target, persistent=True)
    # the default is built from the (sanitised) dataset name and stays under the data folder; any folder is this
    # run's of this dataset alone: another dataset's or run's folder is refused (folders.claim_output_folder)
    folder = os.path.abspath(output_dir) if output_dir else folders.default_folder("generated", target.name, run_key)
    folders.claim_output_folder(folder, target, run_key, shared_by=shared_by)
    return target, folder
