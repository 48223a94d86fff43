"""CLIP image embeddings, computed once per sample and model and stored on the dataset.

The embeddings field remembers which model filled it (in the field's
``info``), so later calls with the same model only encode samples that lack
an embedding, and a different model is refused rather than mixed in.
"""

from __future__ import annotations

import numpy as np
import torch

from fairbalance import images, validation
from fairbalance.models import ClipModel

MODEL_INFO_KEY = "fairbalance_model"


def stored_model(samples, field: str) -> dict | None:
    """The model identity recorded on an embeddings field (None if absent)."""
    f = samples._root_dataset.get_field(field)
    return (f.info or {}).get(MODEL_INFO_KEY) if f is not None else None


def check_field(samples, field: str, clip: ClipModel) -> None:
    """Refuse an embeddings field that holds another model's (or unknown) vectors."""
    if not samples._root_dataset.has_field(field):
        return
    recorded = stored_model(samples, field)
    if recorded != clip.spec.to_dict():
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
    if samples._root_dataset.has_field(field):
        todo = samples.exists(field, False)
    else:
        todo = samples
    ids, paths = todo.values(["id", "filepath"]) if len(todo) else ([], [])
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


def write(samples, field: str, values: dict[str, np.ndarray], clip: ClipModel) -> None:
    """Store new embeddings and tag the field with the model that made them."""
    if not values:
        return
    dataset = samples._root_dataset
    dataset.set_values(field, values, key_field="id")  # only these ids; no select() of 1M ids
    f = dataset.get_field(field)
    description = f"CLIP image embeddings ({clip.spec.model}, {clip.spec.pretrained}), L2-normalized"
    if (f.info or {}).get(MODEL_INFO_KEY) == clip.spec.to_dict() and f.description == description:
        return  # tagged already (a chunked run writes many times)
    f.info = {**(f.info or {}), MODEL_INFO_KEY: clip.spec.to_dict()}
    f.description = description
    f.save()


LOAD_CHUNK = 50_000


def load(samples, field: str, chunk_size: int = LOAD_CHUNK) -> tuple[list[str], np.ndarray, list[str]]:
    """``(ids, matrix, ids_without_embedding)`` of the stored embeddings of ``samples``.

    Read ``chunk_size`` samples at a time into one float32 matrix, so that at
    most one chunk is held twice: reading every vector and then stacking them
    held all the embeddings twice (4 GB for 1M x 512).
    """
    all_ids = samples.values("id")
    ids: list[str] = []
    missing: list[str] = []
    matrix = None
    n = 0
    for start in range(0, len(all_ids), chunk_size):
        chunk = all_ids[start : start + chunk_size]
        got = dict(zip(*samples.select(chunk).values(["id", field])))
        vectors = []
        for i in chunk:
            v = got.get(i)
            if v is None:
                missing.append(i)
            else:
                ids.append(i)
                vectors.append(np.asarray(v, dtype=np.float32))
        if not vectors:
            continue
        block = np.stack(vectors)
        if matrix is None:
            matrix = np.empty((len(all_ids), block.shape[1]), dtype=np.float32)
        matrix[n : n + len(block)] = block
        n += len(block)
    if matrix is None:
        return [], np.zeros((0, 0), dtype=np.float32), missing
    return ids, matrix[:n], missing


def normalize(x: np.ndarray) -> np.ndarray:
    return torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)), dim=-1).numpy()
