"""Loss-based hardness: which samples a deliberately biased classifier gets wrong.

DiffuBias / DiffInject step 1: train a biased classifier with GCE (q=0.7),
compute every sample's cross-entropy under it (eval mode, no augmentation)
and tag the likely bias-conflicting samples: by default the biased model's
error set (JTT), which needs no bias labels; or the top-K losses (ranked per
class, as DiffuBias does, or globally).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance import config as fb_config
from fairbalance import claims, distributed, runs, training, validation, writeback


@dataclass
class HardnessResult:
    run_key: str
    loss_field: str
    rank_field: str
    tag: str
    num_tagged: int
    num_samples: int
    num_skipped: int
    checkpoint: str
    per_class_tagged: dict[str, int]
    train_history: list[dict]

    def to_dict(self) -> dict:
        return asdict(self)


def loss_ranks(losses: np.ndarray, labels: np.ndarray, per_class: bool) -> np.ndarray:
    """Rank of every loss, 1 = highest; within its class when ``per_class`` (ties keep sample order)."""
    ranks = np.empty(len(losses), dtype=int)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)] if per_class else [np.arange(len(losses))]
    for idx in groups:
        ranks[idx[np.argsort(-losses[idx], kind="stable")]] = np.arange(1, len(idx) + 1)
    return ranks


def hardest(ranks: np.ndarray, labels: np.ndarray, k: int, per_class: bool) -> np.ndarray:
    """Indices of the k hardest samples from :func:`loss_ranks`; per class, k is split over the
    classes in proportion to their size (largest remainders get the leftover slots)."""
    if not per_class:
        return np.flatnonzero(ranks <= k)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    share = k * counts / counts.sum()
    quota = np.floor(share).astype(int)
    quota[np.argsort(-(share - quota), kind="stable")[: k - quota.sum()]] += 1
    return np.flatnonzero(ranks <= quota[inverse])


def resolve_top_k(top_k, num_samples: int) -> int | None:
    """``None`` (the error set), a count (int >= 1), or a fraction of the samples (float in (0, 1])."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float, np.integer, np.floating)):
        raise validation.FairBalanceError(f"top_k must be None, a count or a fraction, not {top_k!r}")
    if isinstance(top_k, (float, np.floating)):
        if not (np.isfinite(top_k) and 0 < top_k <= 1):
            raise validation.FairBalanceError(
                f"top_k={top_k!r}: a float is a fraction of the view and must be in (0, 1]; pass an int for a count")
        return max(1, int(math.ceil(top_k * num_samples - 1e-9)))
    if top_k < 1:
        raise validation.FairBalanceError(f"top_k must be >= 1, got {top_k}")
    if top_k > num_samples:
        raise validation.FairBalanceError(f"top_k={top_k} is larger than the {num_samples} labelled samples of the view")
    return int(top_k)


@claims.exclusive
def compute_hardness(
    samples,
    label_field: str = "ground_truth",
    loss_field: str = "bias_loss",
    tag: str = "bias_conflicting",
    top_k: int | float | None = None,
    per_class: bool = True,
    q: float = 0.7,
    backbone: str = "auto",
    pretrained: bool = False,
    image_size: int | None = None,
    normalize: str = "none",
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | None = None,
    num_workers: int = 0,
    run_key: str = "hardness",
    output_dir: str | None = None,
    overwrite: bool = False,
    progress=None,
) -> HardnessResult:
    """Train a GCE-biased classifier, store per-sample CE loss and rank, tag the hard samples.

    ``top_k``: ``None`` (default) tags the biased model's error set, the
    samples it misclassifies (JTT's rule: needs no bias labels); an int tags
    that many highest-loss samples; a float in (0, 1] that fraction of the
    view (``0.01`` = 1%). Only real samples are ranked (generated ones are
    left out). The rank field (``<loss_field>_rank``, 1 = hardest, per class
    when ``per_class``) and the checkpoint (``output_dir``, default under
    ``$FAIRBALANCE_DATA_DIR/checkpoints``) are kept with the run. Rerunning
    with ``overwrite=True`` replaces the previous tags, never accumulates.
    """
    validation.require_nonempty(samples)
    rank_field = f"{loss_field}_rank"
    if not tag or not isinstance(tag, str):
        raise validation.FairBalanceError("tag must be a non-empty string")
    data = training.labelled_samples(samples, label_field).real()
    ids, paths, labels, classes = data.ids, data.filepaths, data.labels, data.classes
    k = resolve_top_k(top_k, len(ids))
    if len(set(labels.tolist())) < 2:
        raise validation.FairBalanceError(f"'{label_field}' has only one class in this view")
    dataset = samples._root_dataset
    output_dir = os.path.abspath(output_dir or os.path.join(fb_config.data_dir(), "checkpoints", dataset.name, run_key))
    params = {
        "label_field": label_field, "loss_field": loss_field, "rank_field": rank_field, "tag": tag,
        "top_k": top_k, "selection": "error_set" if k is None else "top_k", "per_class": per_class, "q": q,
        "backbone": backbone, "pretrained": pretrained, "image_size": image_size, "normalize": normalize,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "checkpoint": output_dir,
    }

    def prepare():  # under a launcher the main process alone claims and writes (fairbalance.distributed)
        validation.require_writable_dir(output_dir)
        run = runs.prepare(samples, run_key, "hardness", params, [loss_field, rank_field], overwrite)
        claims.claim_folder(output_dir)
        old_tag, old_tagged = None, []
        if dataset.has_run(run_key):  # overwrite: its tags go, on the samples it tagged and nowhere else
            old_tag = runs.get_run_config(dataset, run_key).get("tag")
            old_tagged = runs.load_run_results(dataset, run_key).get("tagged_ids") or []
        return run, old_tag, old_tagged

    run, old_tag, old_tagged = distributed.on_main(prepare) or (None, None, [])

    clf = training.train_classifier(
        samples.select(ids), label_field, method="biased", classes=classes, q=q, backbone=backbone,
        pretrained=pretrained, image_size=image_size, normalize=normalize, epochs=epochs, batch_size=batch_size,
        lr=lr, seed=seed, device=device, num_workers=num_workers, progress=progress,
    )
    # under a launcher, each rank on its own GPU (not cuda:0 for all)
    logits = training.predict(clf, paths, device=distributed.device(device), num_workers=num_workers)
    losses = F.cross_entropy(logits, torch.as_tensor(labels), reduction="none").numpy()
    ranks = loss_ranks(losses, labels, per_class)
    if k is None:
        hard = np.flatnonzero(logits.argmax(1).numpy() != labels)
    else:
        hard = hardest(ranks, labels, k, per_class)

    def write():
        clf.save(output_dir)
        view = samples.select(ids)
        writeback.set_values_by_id(view, {
            loss_field: {i: float(v) for i, v in zip(ids, losses)},
            rank_field: {i: int(r) for i, r in zip(ids, ranks)},
        }, ids=ids)
        if old_tag and old_tagged:
            dataset.select(old_tagged).untag_samples(old_tag)
        view.untag_samples(tag)
        if len(hard):
            dataset.select([ids[j] for j in hard]).tag_samples(tag)

    per_class_tagged = {classes[c]: int(n) for c, n in zip(*np.unique(labels[hard], return_counts=True))}
    result = HardnessResult(run_key, loss_field, rank_field, tag, len(hard), len(ids), data.num_unlabelled,
                            output_dir, per_class_tagged, clf.history)
    distributed.on_main(lambda: (run.write(write),
                                 run.save_results({**result.to_dict(), "tagged_ids": [ids[j] for j in hard]})))
    return result
