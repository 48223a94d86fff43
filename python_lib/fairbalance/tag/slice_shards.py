"""Sharded slice discovery: the shards run the model, the merge clusters and names once.

What costs time in :func:`fairbalance.discover_slices` is per image: the
classifier's forward pass (its penultimate layer, first hidden layer and
logits) and the image statistics. A sharded run (``shard``/``num_shards``,
:mod:`fairbalance.core.sharding`) needs the classifier trained once before
the shards (``classifier`` or ``classifier_run``); each shard runs it on its
chunks of samples and stores every sample's outputs as one float32 vector in
``<slice_field>_features`` as it goes (a rerun skips the samples stored). The
merge reads all of them back, then clusters every class, names and ranks the
slices and writes them, with the computation of the unsharded call
(``fairbalance.tag.discovery.slices_from_outputs``): the same settings and
seed give the same slices.
"""

from __future__ import annotations

import numpy as np

from fairbalance.core import sharding, validation, writeback
from fairbalance.tag import hardness, slice_features

def features_field(slice_field: str) -> str:
    """The field a sharded run's shards store each sample's model outputs in (``<slice_field>_features``)."""
    return f"{slice_field}_features"


# the parts of the stored vector, in this order (a part the run does not use is absent)
PARTS = ("logits", "model", "early", "pixels")


def _parts(config: dict, outputs: tuple) -> dict[str, np.ndarray]:
    """The model outputs a sharded run stores: the logits, and each feature source it clusters (the penultimate
    layer only when no ``features_field`` stands for it)."""
    penultimate, logits, extra = outputs
    sources = config["feature_sources"]
    parts = {"logits": logits}
    if "model" in sources and not config["features_field"]:
        parts["model"] = penultimate
    parts.update({s: extra[s] for s in ("early", "pixels") if s in sources})
    return parts


def compute_shard(samples, clf, config: dict, fields: list[str], ids: list[str], run_key: str, shard: int,
                  num_shards: int, chunk_size: int, batch_size: int, device, num_workers: int,
                  progress) -> sharding.ShardResult:
    """One shard of a sharded discovery run (``fields``: those the run writes): chunks run through ``clf``, their
    outputs stored as they finish."""
    import fiftyone.core.utils as fou

    field = features_field(config["slice_field"])
    # only the real labelled samples: unlabelled and generated ones get no slice, as in the unsharded run
    job = sharding.Shard(samples, run_key, "discover_slices", shard, num_shards, config,
                         fields, done_field=field, chunk_size=chunk_size, only=ids)
    dataset = samples._root_dataset
    num_computed = 0
    with fou.ProgressBar(total=max(job.total, 1), progress=progress) as pb:
        pb.update(job.total - len(job.todo))  # done before, or left out
        for chunk in job.chunks():
            data = hardness.real_labelled(samples.select(chunk), config["label_field"], clf, required=False)
            if data.ids:
                parts = _parts(config, slice_features.model_outputs(clf, data.filepaths, device, batch_size,
                                                                    num_workers, config["feature_sources"]))
                layout = {k: int(v.shape[1]) for k, v in parts.items()}
                if job.shared("layout", lambda: layout) != layout:
                    raise validation.FairBalanceError(
                        f"Shard {shard} of run '{run_key}': the model's outputs have other sizes ({layout}) than "
                        f"those of the shards before it ({job.job['shared']['layout']}): all shards need one model")
                matrix = np.concatenate([parts[k] for k in PARTS if k in parts], axis=1).astype(np.float32)
                writeback.set_values_by_id(dataset.select(data.ids), {field: dict(zip(data.ids, matrix))},
                                           ids=data.ids)
                num_computed += len(data.ids)
            job.chunk_done(chunk)
            pb.update(len(chunk))
    return job.finish({"num_computed": num_computed})


def stored_outputs(samples, ids: list[str], field: str, layout: dict) -> tuple:
    """``(penultimate or None, logits, {source: matrix})`` of ``ids`` (in that order) from the shards' vectors."""
    from fairbalance.find import embeddings

    fids, matrix, missing = embeddings.load(samples.select(ids), field)
    if missing or len(fids) != len(ids):
        raise validation.FairBalanceError(
            f"{len(ids) - len(fids)} labelled sample(s) of the view have no '{field}': the view changed after "
            "the shards ran; queue the job again with overwrite=True")
    row = {i: j for j, i in enumerate(fids)}
    matrix = matrix[[row[i] for i in ids]]
    out, start = {}, 0
    for k in PARTS:
        if k in layout:
            out[k] = matrix[:, start:start + layout[k]]
            start += layout[k]
    if start != matrix.shape[1]:
        raise validation.FairBalanceError(f"'{field}' vectors have {matrix.shape[1]} values, not {start}: recompute")
    return out.get("model"), out["logits"], {k: out[k] for k in ("early", "pixels") if k in out}
