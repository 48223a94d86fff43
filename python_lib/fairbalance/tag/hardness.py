"""Loss-based hardness: which samples a deliberately biased classifier gets wrong.

DiffuBias / DiffInject step 1: train a biased classifier with GCE (q=0.7),
compute every sample's cross-entropy under it (eval mode, no augmentation)
and tag the likely bias-conflicting samples: by default the biased model's
error set (JTT), which needs no bias labels; or the top-K losses (ranked per
class, as DiffuBias does, or globally).

Sharded (``shard``/``num_shards``, :mod:`fairbalance.core.sharding`): the biased
classifier is trained once beforehand and passed in (``classifier``); each
shard predicts its chunks of samples and writes their losses and predicted
classes as it goes; the merge ranks all losses (ranks need the whole view),
selects and tags the hard set, exactly as one unsharded call would.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance.core import distributed, folders, models, runs, sharding, validation, writeback
from fairbalance.core.data import LabelledSamples, class_order, labelled_samples
from fairbalance.train import training
from fairbalance.train.network import TrainConfig

# the biased model that ranks the samples when none is given: GCE, 10 epochs (DiffuBias' step 1); the
# defaults of compute_hardness_tags and discover_slices (the rest are TrainConfig's own)
BIASED_MODEL = TrainConfig(method="biased", epochs=10)
# the settings that train the biased model: with a trained ``classifier`` they are its own, not the caller's
TRAINING_SETTINGS = ("q", "backbone", "pretrained", "image_size", "normalize", "epochs", "lr", "seed")


def model_settings(config: TrainConfig, names=TRAINING_SETTINGS + ("batch_size",)) -> dict:
    """The ranking model's settings a run records: those it is trained with here, or a given model's own."""
    return {n: getattr(config, n) for n in names}


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


def output_fields(loss_field: str) -> list[str]:
    """The fields a hardness run writes: the loss, its rank (``_rank``) and the model's predicted class
    (``_prediction``, from which the error set is selected)."""
    return [loss_field, f"{loss_field}_rank", f"{loss_field}_prediction"]


def shard_fields(kwargs: dict) -> list[str]:
    """The fields a sharded run with these ``compute_hardness`` arguments writes (asked by the sharding registry)."""
    import inspect

    return output_fields(kwargs.get("loss_field") or inspect.signature(compute_hardness_tags).parameters["loss_field"].default)


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


def select_hard(losses: np.ndarray, predictions: np.ndarray, labels: np.ndarray, k: int | None,
                per_class: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(ranks, hard)``: the loss ranks and the indices to tag (the error set when ``k`` is None)."""
    ranks = loss_ranks(losses, labels, per_class)
    hard = np.flatnonzero(predictions != labels) if k is None else hardest(ranks, labels, k, per_class)
    return ranks, hard


def _losses(clf, paths, labels, device, batch_size, num_workers, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample cross-entropy (float32) and predicted class index under ``clf`` (eval mode)."""
    logits = training.predict(clf, paths, device=device, batch_size=batch_size, num_workers=num_workers,
                              progress=progress)
    losses = F.cross_entropy(logits, torch.as_tensor(labels), reduction="none").numpy()
    return losses, logits.argmax(1).numpy()


@dataclass
class _Inputs:
    """What :func:`validate_inputs` checked: the real labelled samples, K, and the given classifier."""

    data: LabelledSamples
    k: int | None
    clf: training.TrainedClassifier | None
    folder: str | None  # the given classifier's folder


def _load_given(samples, classifier, classifier_run) -> tuple[training.TrainedClassifier, str]:
    folder = runs.given_or_recorded(samples, classifier, classifier_run, "train_classifier", "checkpoint",
                                    "classifier (the folder of a trained classifier)", "classifier_run")
    if not isinstance(folder, (str, os.PathLike)):
        raise validation.FairBalanceError(f"classifier must be a folder (a path), not {type(folder).__name__}")
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise validation.FairBalanceError(f"classifier={folder!r}: no such folder")
    try:
        return training.load_classifier(folder), folder
    except models.ModelNotFoundError as e:
        raise validation.FairBalanceError(f"classifier={folder!r} is not a loadable classifier: {e}") from e


def real_labelled(samples, label_field: str, clf=None, required: bool = True) -> LabelledSamples:
    """The real (not generated) labelled samples, labels as indices into ``clf``'s classes when given."""
    data = labelled_samples(samples, label_field).real(required)
    if clf is None:
        return data
    unknown = class_order({data.classes[c] for c in np.unique(data.labels)} - set(clf.classes))
    if unknown:
        raise validation.FairBalanceError(
            f"The classifier in {clf.checkpoint} was trained on the classes {clf.classes}; '{label_field}' of this "
            f"view also has {unknown}: use a classifier trained on these labels")
    index = np.array([clf.classes.index(c) if c in clf.classes else -1 for c in data.classes])
    return LabelledSamples(data.ids, data.filepaths, index[data.labels] if len(data.ids) else data.labels,
                                    list(clf.classes), data.generated, data.num_unlabelled)


def validate_inputs(samples, label_field: str = "ground_truth", loss_field: str = "bias_loss",
                    tag: str = "bias_conflicting", top_k=None, classifier: str | None = None,
                    classifier_run: str | None = None, output_dir: str | None = None, sharded: bool = True,
                    **settings) -> _Inputs:
    """The up-front checks of :func:`compute_hardness` (also run by ``queue_sharded`` before queuing, so
    ``sharded`` defaults to True there): the classifier (required when sharded), labels, K, names."""
    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    for name in output_fields(loss_field):
        validation.require_field_name(name)
    validation.require_tag("tag", tag)
    given = classifier is not None or classifier_run is not None
    if sharded and not given:
        raise validation.FairBalanceError(
            "Sharded hardness needs the biased classifier trained once, before the shards (each shard only "
            "predicts): train it with fairbalance.train_classifier(view, label_field, method='biased', "
            "run_key='biased') (or an unsharded fairbalance.compute_hardness_tags) and pass classifier=<its "
            "checkpoint folder> or classifier_run='biased'")
    clf = folder = None
    if given:
        defaults = inspect.signature(compute_hardness_tags).parameters
        extra = [n for n in TRAINING_SETTINGS if n in settings and settings[n] != defaults[n].default]
        extra += ["output_dir"] if output_dir is not None else []
        if extra:
            raise validation.FairBalanceError(
                f"With a trained classifier nothing is trained or saved here: drop {', '.join(extra)} (the run "
                "records the classifier's own training settings)")
        clf, folder = _load_given(samples, classifier, classifier_run)
    data = real_labelled(samples, label_field, clf)
    k = resolve_top_k(top_k, len(data.ids))
    if len(set(data.labels.tolist())) < 2:
        raise validation.FairBalanceError(f"'{label_field}' has only one class in this view")
    return _Inputs(data, k, clf, folder)


@runs.writer("hardness")
def compute_hardness_tags(
    samples,
    label_field: str = "ground_truth",
    loss_field: str = "bias_loss",
    tag: str = "bias_conflicting",
    top_k: int | float | None = None,
    per_class: bool = True,
    q: float = BIASED_MODEL.q,
    backbone: str = BIASED_MODEL.backbone,
    pretrained: bool = BIASED_MODEL.pretrained,
    image_size: int | None = BIASED_MODEL.image_size,
    normalize: str = BIASED_MODEL.normalize,
    epochs: int = BIASED_MODEL.epochs,
    batch_size: int = BIASED_MODEL.batch_size,
    lr: float = BIASED_MODEL.lr,
    seed: int = BIASED_MODEL.seed,
    device: str | None = None,
    num_workers: int = BIASED_MODEL.num_workers,
    classifier: str | None = None,
    classifier_run: str | None = None,
    run_key: str = "hardness",
    output_dir: str | None = None,
    overwrite: bool = False,
    shard: int | None = None,
    num_shards: int | None = None,
    chunk_size: int = sharding.DEFAULT_CHUNK_SIZE,
    progress=None,
) -> HardnessResult | sharding.ShardResult:
    """Train a GCE-biased classifier, store per-sample CE loss and rank, tag the hard samples.

    ``top_k``: ``None`` (default) tags the biased model's error set, the
    samples it misclassifies (JTT's rule: needs no bias labels); an int tags
    that many highest-loss samples; a float in (0, 1] that fraction of the
    view (``0.01`` = 1%). Only real samples are ranked (generated ones are
    left out). The rank field (``<loss_field>_rank``, 1 = hardest, per class
    when ``per_class``), the predicted class (``<loss_field>_prediction``) and
    the checkpoint (``output_dir``, default under
    ``$FAIRBALANCE_DATA_DIR/checkpoints``) are kept with the run. Rerunning
    with ``overwrite=True`` replaces the previous tags, never accumulates.

    ``classifier``: the folder of a classifier trained already (e.g. by
    :func:`fairbalance.train_classifier` with ``method="biased"``), or
    ``classifier_run``: the key of that ``train_classifier`` run; it is used
    as is (its classes must cover the view's labels) and nothing is trained.
    ``shard, num_shards``: compute only shard ``shard`` of ``num_shards``
    (needs ``classifier``; :func:`fairbalance.queue_sharded` queues all
    shards for delegated workers): chunks of ``chunk_size`` samples are
    predicted and their losses written as they finish, a rerun skips the
    samples done, and the last shard to finish ranks, tags and records the
    run, equal to one unsharded call with the same classifier; returns a
    :class:`~fairbalance.core.sharding.ShardResult`.
    """
    sharded = shard is not None or num_shards is not None
    biased = replace(BIASED_MODEL, label_field=label_field, q=q, backbone=backbone, pretrained=pretrained,
                     image_size=image_size, normalize=normalize, epochs=epochs, batch_size=batch_size, lr=lr,
                     seed=seed, num_workers=num_workers)
    checked = validate_inputs(samples, label_field, loss_field, tag, top_k, classifier, classifier_run, output_dir,
                              sharded, **model_settings(biased, TRAINING_SETTINGS))
    sharding.one_shard_requested(shard, num_shards, overwrite)
    data, k, clf = checked.data, checked.k, checked.clf
    ids, paths, labels, classes = data.ids, data.filepaths, data.labels, data.classes
    fields = output_fields(loss_field)
    dataset = samples._root_dataset
    params, output_dir = _run_params(label_field, loss_field, fields, tag, top_k, k, per_class, clf, checked.folder,
                                     classifier_run, dataset, run_key, output_dir, model_settings(biased))
    if sharded:
        return _compute_shard(samples, clf, params, ids, run_key, shard, num_shards, chunk_size, batch_size, device,
                              num_workers, progress)

    # under a launcher the main process alone claims and writes (fairbalance.core.distributed)
    run, old_tag, old_tagged = distributed.on_main(_prepare_run, samples, run_key, params, fields, overwrite,
                                                   clf is None, output_dir) or (None, None, [])

    trained = clf is None
    if trained:
        clf = training.train_classifier(samples.select(ids), replace(biased, classes=classes), device=device,
                                        progress=progress)
    # under a launcher, each rank on its own GPU (not cuda:0 for all)
    losses, predictions = _losses(clf, paths, labels, distributed.device(device), batch_size, num_workers)
    ranks, hard = select_hard(losses, predictions, labels, k, per_class)

    tagged: list[str] = []  # the samples this run tagged (not those that had the tag already)

    def write():
        if trained:
            folders.replace_contents(output_dir, clf.save)
        # keyed by id, no select(ids): a $in of 1M ids is over MongoDB's 16 MB command limit
        writeback.set_values_by_id(dataset, {
            fields[0]: {i: float(v) for i, v in zip(ids, losses)},
            fields[1]: {i: int(r) for i, r in zip(ids, ranks)},
            fields[2]: {i: classes[p] for i, p in zip(ids, predictions)},
        }, ids=ids)
        tagged[:] = _retag(dataset, ids, [ids[j] for j in hard], tag, old_tag, old_tagged)

    per_class_tagged = {classes[c]: int(n) for c, n in zip(*np.unique(labels[hard], return_counts=True))}
    result = HardnessResult(run_key, loss_field, fields[1], tag, len(hard), len(ids), data.num_unlabelled,
                            output_dir, per_class_tagged, clf.history)
    distributed.on_main(lambda: (run.write(write),
                                 run.save_results({**result.to_dict(), "tagged_ids": tagged})))
    return result


def _run_params(label_field, loss_field, fields, tag, top_k, k, per_class, clf, folder, classifier_run, dataset,
                run_key, output_dir, settings: dict) -> tuple[dict, str]:
    """The run's config, with the ranking model's settings: those it is trained with here, or a given model's own
    training settings (so the record says which model ranked the samples); the model's folder."""
    params = {
        "label_field": label_field, "loss_field": loss_field, "rank_field": fields[1], "prediction_field": fields[2],
        "tag": tag, "top_k": top_k, "selection": "error_set" if k is None else "top_k", "per_class": per_class,
    }
    if clf is None:
        output_dir = os.path.abspath(output_dir or folders.default_folder("checkpoints", dataset.name, run_key))
        params.update(**settings, checkpoint=output_dir, classifier=None, classifier_run=None)
        return params, output_dir
    params.update(**model_settings(clf.config), checkpoint=folder, classifier=folder, classifier_run=classifier_run,
                  training_method=clf.config.method)
    return params, folder


def _prepare_run(samples, run_key, params, fields, overwrite, trains: bool, output_dir):
    """The run (prepared), the folder claimed when a model is trained here, and the tag and tagged ids of the run
    this one replaces (overwrite: its tags go, on the samples it tagged and nowhere else)."""
    dataset = samples._root_dataset
    run = runs.prepare(samples, run_key, "hardness", params, fields, overwrite)
    if trains:  # this run's folder alone (another run key or dataset is refused, overwrite included)
        folders.claim_output_folder(output_dir, dataset, run_key)
    old_tag, old_tagged = None, []
    if dataset.has_run(run_key):
        old_tag = runs.get_run_config(dataset, run_key).get("tag")
        old_tagged = runs.load_run_results(dataset, run_key).get("tagged_ids") or []
    return run, old_tag, old_tagged


compute_hardness = compute_hardness_tags  # its name before the SDK name matched the App's (kept as an alias)


def _retag(dataset, ids: list[str], hard_ids: list[str], tag: str, old_tag: str | None,
           old_tagged: list[str]) -> list[str]:
    """The previous run's tags off the samples it tagged, then ``tag`` on the hard ones; returns those it tagged.

    A tag is only ever removed from samples a run tagged itself (recorded as
    ``tagged_ids``): a user's own tag of the same name (``train``,
    ``bias_conflicting``) stays, and is not recorded as this run's.
    """
    if old_tag and old_tagged:
        dataset.select(old_tagged).untag_samples(old_tag)
    had = set(dataset.select(hard_ids).match_tags(tag).values("id")) if hard_ids else set()
    new = [i for i in hard_ids if i not in had]
    if new:
        dataset.select(new).tag_samples(tag)
    return new


def _compute_shard(samples, clf, params, ids, run_key, shard, num_shards, chunk_size, batch_size, device,
                   num_workers, progress) -> sharding.ShardResult:
    """One shard of a sharded hardness run: chunks predicted, their losses and predictions written as they finish."""
    import fiftyone.core.utils as fou

    loss_field, pred_field = params["loss_field"], params["prediction_field"]
    # only the real labelled samples: unlabelled and generated ones get no loss, as in the unsharded run
    job = sharding.Shard(samples, run_key, "compute_hardness_tags", shard, num_shards, params,
                         output_fields(loss_field), done_field=loss_field, chunk_size=chunk_size, only=ids)
    dataset = samples._root_dataset
    num_predicted = 0
    with fou.ProgressBar(total=max(job.total, 1), progress=progress) as pb:
        pb.update(job.total - len(job.todo))  # done before, or left out
        for chunk in job.chunks():
            data = real_labelled(samples.select(chunk), params["label_field"], clf, required=False)
            if data.ids:
                losses, predictions = _losses(clf, data.filepaths, data.labels, device, batch_size, num_workers)
                # the prediction first: the loss marks a sample done (a rerun skips it)
                writeback.set_values_by_id(dataset.select(data.ids), {
                    pred_field: {i: clf.classes[p] for i, p in zip(data.ids, predictions)},
                    loss_field: {i: float(v) for i, v in zip(data.ids, losses)},
                }, ids=data.ids)
                num_predicted += len(data.ids)
            job.chunk_done(chunk)
            pb.update(len(chunk))
    return job.finish({"num_predicted": num_predicted})


def merge_shards(samples, job: dict) -> dict:
    """Rank all losses of a sharded run, select and tag the hard set: the results of the unsharded run."""
    cfg = job["config"]
    loss_field, rank_field, pred_field, tag = cfg["loss_field"], cfg["rank_field"], cfg["prediction_field"], cfg["tag"]
    clf = training.load_classifier(cfg["classifier"])
    data = real_labelled(samples, cfg["label_field"], clf)
    ids, labels, classes = data.ids, data.labels, data.classes
    dataset = samples._root_dataset
    all_ids, stored_losses, stored_preds = samples.values(["id", loss_field, pred_field])
    row = {i: j for j, i in enumerate(all_ids)}
    missing = sum(stored_losses[row[i]] is None or stored_preds[row[i]] is None for i in ids)
    if missing:
        raise validation.FairBalanceError(
            f"{missing} labelled sample(s) of the view have no '{loss_field}': the view changed after the shards "
            "ran; queue the job again with overwrite=True")
    index = {c: n for n, c in enumerate(classes)}
    losses = np.array([stored_losses[row[i]] for i in ids], dtype=np.float64)
    predictions = np.array([index[stored_preds[row[i]]] for i in ids])
    del row, stored_losses, stored_preds
    k = resolve_top_k(cfg["top_k"], len(ids))
    ranks, hard = select_hard(losses, predictions, labels, k, cfg["per_class"])
    writeback.set_values_by_id(dataset, {rank_field: {i: int(r) for i, r in zip(ids, ranks)}}, ids=ids)
    hard_ids = [ids[j] for j in hard]
    tagged = _retag(dataset, ids, hard_ids, tag, None, [])
    per_class_tagged = {classes[c]: int(n) for c, n in zip(*np.unique(labels[hard], return_counts=True))}
    result = HardnessResult(job["run_key"], loss_field, rank_field, tag, len(hard), len(ids), data.num_unlabelled,
                            cfg["checkpoint"], per_class_tagged, clf.history)
    return {**result.to_dict(), "tagged_ids": tagged}
