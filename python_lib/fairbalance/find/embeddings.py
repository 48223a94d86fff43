"""CLIP image embeddings, computed once per sample and model and stored on the dataset.

The embeddings field remembers which model filled it (in the field's
``info``), so later calls with the same model only encode samples that lack
an embedding, and a different model is refused rather than mixed in.
"""

from __future__ import annotations

import numpy as np
import torch

from fairbalance.core import images, validation
from fairbalance.core.models import ClipModel

MODEL_INFO_KEY = "fairbalance_model"


def _field_doc(dataset, field: str) -> dict | None:
    """The field's description as stored in the database now (not this process's copy, which may be stale)."""
    import fiftyone.core.odm as foo

    doc = foo.get_db_conn().datasets.find_one({"_id": dataset._doc.id},
                                              {"sample_fields": {"$elemMatch": {"name": field}}})
    fields = (doc or {}).get("sample_fields") or []
    return fields[0] if fields else None


def stored_model(samples, field: str) -> dict | None:
    """The model identity recorded on an embeddings field (None if absent), as stored in the database now."""
    doc = _field_doc(samples._root_dataset, field)
    return ((doc or {}).get("info") or {}).get(MODEL_INFO_KEY)


def _has_values(dataset, field: str) -> bool:
    return bool(len(dataset.exists(field).limit(1)))


def check_field(samples, field: str, clip: ClipModel) -> None:
    """Refuse an embeddings field that holds another model's (or unknown) vectors.

    A field without a model tag and without any value holds nothing to mix
    with (a writer stopped before its first value), so it is accepted.
    """
    dataset = samples._root_dataset
    doc = _field_doc(dataset, field)
    if doc is None:
        return
    recorded = (doc.get("info") or {}).get(MODEL_INFO_KEY)
    if recorded == clip.spec.to_dict():
        return
    if recorded is None:
        dataset.reload()
        if not dataset.has_field(field) or not _has_values(dataset, field):
            return
    what = f"model {recorded.get('model')}/{recorded.get('pretrained')}" if recorded else "an unknown model"
    raise validation.FairBalanceError(
        f"Field '{field}' holds embeddings from {what}; choose another embeddings_field for "
        f"{clip.spec.model}/{clip.spec.pretrained} or delete the field"
    )


def compute_missing(
    samples,
    field: str,
    clip: ClipModel,
    batch_size: int = 64,
    num_workers: int | None = None,
    skip_failures: bool = False,
    progress=None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Encode the samples of ``samples`` that have no embedding in ``field`` yet.

    Returns ``({sample_id: embedding}, {sample_id: error})``; writes nothing.
    """
    import fiftyone.core.utils as fou

    check_field(samples, field, clip)
    if _field_doc(samples._root_dataset, field) is not None and not samples._root_dataset.has_field(field):
        samples._root_dataset.reload()  # added by another process since this one read the schema
    if samples._root_dataset.has_field(field):
        todo = samples.exists(field, False)
    else:
        todo = samples
    ids, paths = todo.values(["id", "filepath"])  # a real query: len() of a dataset is an estimate
    out: dict[str, np.ndarray] = {}
    report = images.LoadReport()
    if ids:
        with fou.ProgressBar(total=len(ids), progress=progress) as pb:
            for idx, batch in images.iter_batches(
                paths, clip.preprocess, batch_size, num_workers, skip_failures, report,
                pin_memory=clip.device.type == "cuda",
            ):
                emb = clip.encode_images(batch).numpy()
                for j, i in enumerate(idx):
                    out[ids[i]] = emb[j]
                pb.update(len(idx))
    failures = {ids[i]: err for i, err in report.failures.items()}
    return out, failures


def _tag(dataset, field: str, spec: dict, description: str) -> None:
    """Record ``spec`` on the field in one atomic update of that field's entry alone.

    ``Field.save()`` (and any schema change) makes FiftyOne rewrite the
    dataset's whole field list from this process's copy, so a process with a
    stale copy cleared another's tag; this touches nothing else.
    """
    import fiftyone.core.odm as foo

    doc = _field_doc(dataset, field) or {}
    info = {**(doc.get("info") or {}), MODEL_INFO_KEY: spec}
    foo.get_db_conn().datasets.update_one(
        {"_id": dataset._doc.id, "sample_fields.name": field},
        {"$set": {"sample_fields.$.info": info, "sample_fields.$.description": description}})


def write(samples, field: str, values: dict[str, np.ndarray], clip: ClipModel) -> None:
    """Store new embeddings in a field tagged with the model that made them.

    The field is declared and tagged *before* any value is written (a field
    holding values without its tag would be refused for good, e.g. after a
    kill between the two), from a freshly read schema (a stale one made
    FiftyOne re-add the field untagged); the tag is checked again after the
    values are in, as a concurrent writer's stale schema may have removed it.
    """
    import fiftyone as fo

    if not values:
        return
    dataset = samples._root_dataset
    spec = clip.spec.to_dict()
    description = f"CLIP image embeddings ({clip.spec.model}, {clip.spec.pretrained}), L2-normalized"
    if _field_doc(dataset, field) is None or not dataset.has_field(field):
        dataset.reload()
        if not dataset.has_field(field):
            dataset.add_sample_field(field, fo.VectorField, description=description, info={MODEL_INFO_KEY: spec})
    doc = _field_doc(dataset, field) or {}
    if (doc.get("info") or {}).get(MODEL_INFO_KEY) != spec or doc.get("description") != description:
        _tag(dataset, field, spec, description)
    dataset.set_values(field, values, key_field="id", expand_schema=False)  # only these ids; no select() of 1M ids
    if stored_model(dataset, field) != spec:  # cleared meanwhile by another process's stale schema: restore it
        _tag(dataset, field, spec, description)
    dataset.reload()


_NPY_MAGIC = b"\x93NUMPY"


class _VectorDecoder:
    """FiftyOne's stored vectors (zlib-compressed ``.npy`` bytes) to arrays, parsing each distinct ``.npy``
    header once: ``np.load`` parses it for every vector (most of the ~300 us per 512-d vector here)."""

    def __init__(self):
        self._headers: dict[bytes, tuple[np.dtype, tuple, bool]] = {}

    def __call__(self, value) -> np.ndarray:
        import ast
        import zlib

        import fiftyone.core.utils as fou

        if not isinstance(value, bytes):  # a list field, or anything else FiftyOne can read
            return np.asarray(value)
        raw = zlib.decompress(value)
        if raw[:6] != _NPY_MAGIC or raw[6] not in (1, 2, 3):
            return fou.deserialize_numpy_array(value)
        size, start = (2, 8) if raw[6] == 1 else (4, 8)
        length = int.from_bytes(raw[start:start + size], "little")
        offset = start + size + length
        header = raw[start + size:offset]
        spec = self._headers.get(header)
        if spec is None:
            d = ast.literal_eval(header.decode("latin1"))
            spec = self._headers[header] = (np.dtype(d["descr"]), tuple(d["shape"]), bool(d["fortran_order"]))
        dtype, shape, fortran = spec
        if dtype.hasobject:
            return fou.deserialize_numpy_array(value)
        return np.frombuffer(raw, dtype, offset=offset).reshape(shape, order="F" if fortran else "C")


def load(samples, field: str) -> tuple[list[str], np.ndarray, list[str]]:
    """``(ids, matrix, ids_without_embedding)`` of the stored embeddings of ``samples``, in the view's order.

    One pass over the view's documents (only ``field`` is read), each vector
    decoded straight into one float32 matrix, so the embeddings are never held
    twice: reading every vector and then stacking them held all of them twice
    (4 GB for 1M x 512), and FiftyOne's ``values()`` decodes each vector
    through ``np.load`` (3.3x slower at 100k x 512 here).
    """
    decode = _VectorDecoder()
    ids: list[str] = []
    missing: list[str] = []
    matrix = None
    for doc in samples._aggregate(pipeline=[{"$project": {field: True}}]):
        value = doc.get(field)
        if value is None:
            missing.append(str(doc["_id"]))
            continue
        vector = decode(value).reshape(-1)
        if matrix is None:
            matrix = np.empty((validation.count_samples(samples), len(vector)), dtype=np.float32)
        if len(vector) != matrix.shape[1]:
            raise validation.FairBalanceError(
                f"'{field}' vectors differ in length ({matrix.shape[1]} and {len(vector)}): recompute the field")
        matrix[len(ids)] = vector
        ids.append(str(doc["_id"]))
    if matrix is None:
        return [], np.zeros((0, 0), dtype=np.float32), missing
    return ids, matrix[:len(ids)], missing


def normalize(x: np.ndarray) -> np.ndarray:
    return torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)), dim=-1).numpy()
