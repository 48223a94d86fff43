"""Classifier training, prediction and evaluation written back to the dataset.

``train_classifier`` (vanilla, biased GCE, JTT, LfF, or real + generated
samples) records a run with the checkpoint;
``apply_classifier`` writes ``fo.Classification`` predictions with confidence
and logits (so ``evaluate_classifications`` and the Brain's hardness work on
them); ``evaluate_classifier`` reports accuracy, bias-aligned/conflicting
accuracy and worst-group accuracy over (class x attribute) groups.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from fairbalance.core import distributed, folders, runs, validation, writeback
from fairbalance.train import group_robust, training
from fairbalance.core.fields import label_path
from fairbalance.train.network import CLASSIFIER, TrainConfig, TrainedClassifier, check_use_generated


# the keyword defaults are TrainConfig's (its fields' defaults are the one source); the signature stays explicit
# because users and the App form read it
@runs.writer("train_classifier")
def train_classifier(
    samples,
    label_field: str = TrainConfig.label_field,
    method: str = TrainConfig.method,
    val_samples=None,
    backbone: str = TrainConfig.backbone,
    pretrained: bool = TrainConfig.pretrained,
    image_size: int | None = TrainConfig.image_size,
    normalize: str = TrainConfig.normalize,
    epochs: int = TrainConfig.epochs,
    batch_size: int = TrainConfig.batch_size,
    lr: float = TrainConfig.lr,
    weight_decay: float = TrainConfig.weight_decay,
    q: float = TrainConfig.q,
    ema: float = TrainConfig.ema,
    hard_tag: str | None = TrainConfig.hard_tag,
    upweight: float = TrainConfig.upweight,
    weight_field: str | None = TrainConfig.weight_field,
    synthetic_weight: float = TrainConfig.synthetic_weight,
    max_synthetic_fraction: float | None = TrainConfig.max_synthetic_fraction,
    seed: int = TrainConfig.seed,
    device: str | None = None,
    num_workers: int = TrainConfig.num_workers,
    supcon_weight: float = TrainConfig.supcon_weight,
    supcon_temperature: float = TrainConfig.supcon_temperature,
    projection_dim: int = TrainConfig.projection_dim,
    head_epochs: int = TrainConfig.head_epochs,
    stage1_real: bool = TrainConfig.stage1_real,
    exclude_field: str | None = TrainConfig.exclude_field,
    group_field: str | None = TrainConfig.group_field,
    dro_step: float = TrainConfig.dro_step,
    refit_head: bool = TrainConfig.refit_head,
    use_generated: bool = TrainConfig.use_generated,
    run_key: str | None = "classifier",
    output_dir: str | None = None,
    overwrite: bool = False,
    progress=None,
) -> TrainedClassifier:
    """Train a classifier with a debiasing ``method``, save it and record a run.

    ``method``: ``vanilla``, ``biased`` (GCE), ``jtt`` (upweight ``hard_tag`` by ``upweight``), ``lff``
    (Learning from Failure), ``synthetic`` (real + generated samples that carry the label), ``two_stage``
    (CE + SupCon on generated samples, then the linear head on the real ones: ``supcon_weight``,
    ``supcon_temperature``, ``projection_dim``, ``head_epochs``, ``stage1_real``), ``group_dro`` / ``dfr``
    on the (class, ``group_field``) groups (``dro_step``; DFR refits the last layer on ``val_samples``, a
    held-out split). ``refit_head=True`` (any other method but ``biased``): DFR's refit of the last layer on
    ``val_samples`` after the method (last epoch), balanced over the classes or the (class, ``group_field``)
    groups. ``use_generated=True`` (``lff``, ``jtt``): the generated samples train too, as in ``synthetic``.
    Generated samples marked in ``exclude_field`` (``filter_generated(action="exclude")``) are left out.
    See :mod:`fairbalance.train.training` for the recipes. The run (``run_key``; None trains without
    recording) holds the full config, the history, the selected epoch and the checkpoint folder
    (``output_dir``, default under ``$FAIRBALANCE_DATA_DIR/checkpoints``), checked before training.
    Under ``accelerate launch`` / ``torchrun`` every process trains its slice of each global batch and the
    main process alone claims, saves and records the run (:mod:`fairbalance.core.distributed`).
    """
    config = TrainConfig.from_arguments(locals())  # the keywords above that are TrainConfig's fields
    validation.require_seed(seed)  # before the run is prepared (the config's own checks come later)
    check_use_generated(method, use_generated)
    dataset = samples._root_dataset
    # the run records the settings (not num_workers); group_field and dro_step only where used, as older runs did
    params = {k: v for k, v in config.settings().items() if k != "num_workers"}
    if group_field is not None or method in group_robust.METHODS or refit_head is not False:
        group_robust.check(method, group_field, dro_step, val_samples, refit_head)  # before the run is prepared
    if group_field is None and method not in group_robust.METHODS:
        del params["group_field"], params["dro_step"]
    run = folder = None
    distributed.setup(device)
    if run_key is not None:
        folder = os.path.abspath(output_dir or folders.default_folder("checkpoints", dataset.name, run_key))
        recorded = {("training_method" if k == "method" else k): v for k, v in params.items()}

        def prepare():  # the main process only; the others wait for it (and raise its error)
            run = runs.prepare(samples, run_key, "train_classifier", recorded, [], overwrite)
            # the folder is this run's alone (another run key or dataset is refused, overwrite included)
            folders.claim_output_folder(folder, dataset, run_key)
            return run

        run = distributed.on_main(prepare)
    clf = training.train_classifier(samples, config, val_samples=val_samples, device=device, progress=progress,
                                    make_loop=group_robust.loop_for)
    if run_key is not None:
        clf.run_key, clf.checkpoint = run_key, folder

        def record():
            run.config.update({"checkpoint": folder, "train_config": asdict(clf.config)})
            run.write(lambda: folders.replace_contents(folder, clf.save))
            run.save_results({"history": clf.history, "best_epoch": clf.best_epoch, "num_skipped": clf.num_skipped,
                              "num_generated_used": clf.num_generated_used,
                              "num_generated_excluded": clf.num_generated_excluded,
                              "num_filtered_out": clf.num_filtered_out,
                              "model_selection": clf.config.model_selection, "checkpoint": folder})

        distributed.on_main(record)
    return clf


def _as_classifier(model, classifier_run: str | None = None, samples=None) -> TrainedClassifier:
    """The classifier, its folder or its run's (:func:`runs.recorded_model`), loaded."""
    return runs.recorded_model(samples, CLASSIFIER.name, model, classifier_run, "model (a classifier or its folder)",
                               "classifier_run")


@dataclass
class ApplyResult:
    """Where the predictions went and how many samples got one."""

    run_key: str
    predictions_field: str
    num_predicted: int
    classes: list[str]
    checkpoint: str | None

    def to_dict(self) -> dict:
        return asdict(self)


@runs.writer("apply_classifier", keys=lambda a: {a["run_key"] or a["predictions_field"]: "apply_classifier"})
def apply_classifier(
    samples,
    model=None,
    predictions_field: str = "predictions",
    classifier_run: str | None = None,
    batch_size: int = 256,
    device: str | None = None,
    num_workers: int = 0,
    store_logits: bool = True,
    run_key: str | None = None,
    overwrite: bool = False,
    progress=None,
) -> ApplyResult:
    """Predict every sample of ``samples`` and store ``fo.Classification`` (label, confidence, logits).

    ``model``: a :class:`TrainedClassifier` or its checkpoint folder; or
    ``classifier_run``: the key of its ``train_classifier`` run. The
    predictions are recorded as run ``run_key`` (default: the predictions
    field's name), which owns ``predictions_field``: an existing field of
    another run, or one fairbalance did not write (such as the labels), is
    refused; ``overwrite=True`` replaces this run's predictions.
    """
    import fiftyone as fo

    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    validation.require_field_name(predictions_field)
    clf = _as_classifier(model, classifier_run, samples)
    if predictions_field == clf.config.label_field:
        raise validation.FairBalanceError(
            f"predictions_field '{predictions_field}' is the field the classifier was trained on: writing "
            "predictions there would replace the labels; choose another field")
    validation.require_positive_int("batch_size", batch_size)
    ids, paths = samples.values(["id", "filepath"])
    run_key = predictions_field if run_key is None else run_key
    run = runs.prepare(samples, run_key, "apply_classifier",
                       {"model": asdict(clf.config), "checkpoint": clf.checkpoint, "classifier_run": clf.run_key,
                        "predictions_field": predictions_field}, [predictions_field], overwrite)
    logits = training.predict(clf, paths, device=device, batch_size=batch_size, num_workers=num_workers,
                              progress=progress)
    probs = torch.softmax(logits, dim=1)
    conf, pred = probs.max(dim=1)
    values = {
        i: fo.Classification(
            label=clf.classes[int(p)], confidence=float(c), logits=l.tolist() if store_logits else None
        )
        for i, p, c, l in zip(ids, pred, conf, logits)
    }
    run.write(lambda: writeback.set_values_by_id(samples, {predictions_field: values}, ids=ids))
    result = ApplyResult(run_key, predictions_field, len(ids), list(clf.classes), clf.checkpoint)
    run.save_results(result.to_dict())
    return result


@dataclass
class Evaluation:
    accuracy: float
    num_samples: int
    aligned_accuracy: float | None = None
    conflicting_accuracy: float | None = None
    worst_group_accuracy: float | None = None
    worst_group: str | None = None
    group_accuracy: dict[str, float] = field(default_factory=dict)
    run_key: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@runs.writer("evaluate_classifier")
def evaluate_classifier(
    samples,
    predictions_field: str = "predictions",
    label_field: str = "ground_truth",
    attribute_field: str | None = None,
    aligned_field: str | None = None,
    run_key: str | None = None,
    overwrite: bool = False,
) -> Evaluation:
    """Accuracy; split by a bool bias-aligned field; worst-group accuracy over (class x attribute)."""
    validation.require_nonempty(samples)
    if predictions_field == label_field:
        raise validation.FairBalanceError(
            f"predictions_field and label_field are both '{label_field}': a field scored against itself")
    paths = [label_path(samples, predictions_field), label_path(samples, label_field)]
    if attribute_field:
        paths.append(label_path(samples, attribute_field))
    if aligned_field:
        validation.require_fields(samples, [aligned_field])
        paths.append(aligned_field)
    cols = samples.values(paths)
    keep = [j for j in range(len(cols[0])) if cols[0][j] is not None and cols[1][j] is not None]
    if not keep:
        raise validation.FairBalanceError(f"No sample has both '{predictions_field}' and '{label_field}'")
    pred = np.array([str(cols[0][j]) for j in keep])
    true = np.array([str(cols[1][j]) for j in keep])
    correct = pred == true
    ev = Evaluation(float(correct.mean()), len(keep))
    col = 2
    if attribute_field:
        attr = np.array([str(cols[col][j]) for j in keep])
        col += 1
        groups = {}
        for g in sorted(set(zip(true, attr))):
            mask = (true == g[0]) & (attr == g[1])
            groups[f"{g[0]}|{g[1]}"] = float(correct[mask].mean())
        ev.group_accuracy = groups
        ev.worst_group = min(groups, key=groups.get)
        ev.worst_group_accuracy = groups[ev.worst_group]
    if aligned_field:
        aligned = np.array([cols[col][j] for j in keep])
        if (aligned == True).any():  # noqa: E712
            ev.aligned_accuracy = float(correct[aligned == True].mean())  # noqa: E712
        if (aligned == False).any():  # noqa: E712
            ev.conflicting_accuracy = float(correct[aligned == False].mean())  # noqa: E712
    if run_key is not None:
        run = runs.prepare(samples, run_key, "evaluate_classifier",
                           {"predictions_field": predictions_field, "label_field": label_field,
                            "attribute_field": attribute_field, "aligned_field": aligned_field}, [], overwrite)
        ev.run_key = run_key
        run.write(lambda: None)
        run.save_results(ev.to_dict())
    return ev
