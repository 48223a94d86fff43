"""Image classifiers on FiftyOne views, and the debiasing recipes that train them.

Methods (``method=``):

- ``vanilla``: cross-entropy on the real samples.
- ``biased``: Generalized Cross Entropy (Zhang & Sabuncu 2018), ``L = (1 - p_y^q) / q``,
  whose gradient is ``p_y^q * grad CE``: easy (bias-aligned) samples dominate,
  so the model learns the bias on purpose (LfF, DiffuBias, DiffInject step 1).
- ``jtt``: Just Train Twice: the samples of a "hard" tag (the error set of a
  biased model, :func:`fairbalance.compute_hardness_tags`) weigh ``upweight``.
- ``lff``: Learning from Failure (Nam et al. 2020): a GCE-biased and a debiased
  model trained together; each sample weighs ``CE_b / (CE_b + CE_d)`` of the
  two models' per-sample losses (EMA over epochs, normalised per class).
- ``synthetic``: cross-entropy on the real samples plus the generated ones
  (``generated == True``) that carry the class label (DiffuBias' and
  DiffInject's last step), optionally down-weighted or capped.
- ``two_stage`` (Basu et al.): stage 1 trains the whole model on the generated
  samples (with ``stage1_real``, also the real ones) with cross-entropy plus
  a supervised contrastive loss (SupCon, Khosla et al. 2020) on a projection
  head (``supcon_weight``, ``supcon_temperature``, ``projection_dim``);
  stage 2 freezes the encoder and trains only the linear head on the real
  samples for ``head_epochs`` (model selection on the validation view here).
- ``group_dro`` / ``dfr``: GroupDRO and Deep Feature Reweighting on the
  (class, ``group_field``) groups, real or discovered (:mod:`fairbalance.train.group_robust`).

``refit_head=True`` (any method but ``biased`` and ``dfr``): after the method's
training (last epoch), DFR's last-layer refit on ``val_samples``, class-balanced
or (class, ``group_field``)-balanced: e.g. LfF's or two-stage's features with a
head fitted on a small unbiased labelled split.

Only ``synthetic`` and ``two_stage`` train on generated samples (and ``lff`` /
``jtt`` with ``use_generated=True``: LfF's weights then cover the generated
samples too, JTT's upweighting stays on its tag); the other methods leave
them out (counted in ``num_generated_excluded``), so every method can be
compared on the same view. Generated samples marked ``True`` in
``exclude_field`` (``filter_generated(action="exclude")``) are left out of
every method that trains on them (``num_filtered_out``).

Inputs are the images at their native size (all must share it; or pass
``image_size``) in [0, 1], optionally normalised with the training images'
per-channel statistics (``normalize="dataset"``) or ImageNet's; the choice is
stored with the model, which normalises its own inputs. With ``val_samples``
the epoch with the best validation accuracy is kept (model selection).

Under ``accelerate launch`` / ``torchrun`` (:mod:`fairbalance.core.distributed`)
every process draws the same global batch of ``batch_size``, computes its
slice, and the gradients are summed over the processes (losses written as
each slice's share of the global mean; LfF's per-sample weights and SupCon's
positives use the whole global batch), so N processes take the steps one
process would. Batch-norm layers (``cnn``, ``resnet18``) normalise each
process's slice on its own.

The model itself (config, backbones, checkpoint, prediction) is :mod:`fairbalance.train.network`.
"""

from __future__ import annotations

import copy
import functools
import random
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairbalance.core import distributed, validation
from fairbalance.core.data import (  # noqa: F401  (also training.<name>: the recipes' data helpers)
    LabelledSamples, class_order, image_transform, labelled_samples, load_images, native_size, seed_everything)
from fairbalance.train.network import (IMAGENET_MEAN, IMAGENET_STD, TrainConfig, TrainedClassifier,
                                       build_model, channel_stats, resnet18_weights, resolve_backbone,
                                       split_encoder_head, trains_on_generated)
from .network import (AUTO_MLP_MAX_SIDE, BACKBONES, METHODS, NORMALIZATIONS, TORCHVISION_RESNET18_FILE,  # noqa: F401
                      Normalize, _channel_stats, build_backbone, load_classifier, predict)


def gce_loss(logits: torch.Tensor, targets: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """Per-sample Generalized Cross Entropy ``(1 - p_y^q) / q``."""
    if not 0 < q <= 1:
        raise ValueError("q must be in (0, 1]")
    p_y = F.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1).clamp_min(1e-8)
    return (1.0 - p_y.pow(q)) / q


def _sample_weights(samples, data: LabelledSamples, config: TrainConfig) -> np.ndarray:
    """Per-sample loss weights: ``weight_field`` x JTT upweighting x synthetic weight."""
    w = np.ones(len(data.ids), dtype=np.float64)
    if config.weight_field:
        validation.require_fields(samples, [config.weight_field])
        by_id = dict(zip(*samples.values(["id", config.weight_field])))
        w *= np.array([1.0 if by_id.get(i) is None else float(by_id[i]) for i in data.ids])
        if np.any(w < 0) or not np.all(np.isfinite(w)):
            raise validation.FairBalanceError(f"'{config.weight_field}' must hold finite non-negative weights")
    if config.method == "jtt":
        hard = set(samples.match_tags(config.hard_tag).values("id"))
        if not hard & set(data.ids):
            raise validation.FairBalanceError(
                f"No labelled sample of the view is tagged '{config.hard_tag}': run compute_hardness_tags first")
        w *= np.array([config.upweight if i in hard else 1.0 for i in data.ids])
    if trains_on_generated(config):
        w[data.generated] *= config.synthetic_weight
    return w


def select_training_samples(data: LabelledSamples, config: TrainConfig, rng: np.random.Generator
                            ) -> tuple[LabelledSamples, int]:
    """Real samples, plus the generated ones for ``synthetic`` / ``two_stage`` (capped); how many generated are left out."""
    real = np.flatnonzero(~data.generated)
    gen = np.flatnonzero(data.generated)
    if not len(real):
        raise validation.FairBalanceError("The view has no real (non-generated) labelled samples")
    if not trains_on_generated(config):
        return data.subset(real), len(gen)
    if not len(gen):
        raise validation.FairBalanceError(
            f"method='{config.method}'{' with use_generated=True' if config.use_generated else ''} needs generated "
            f"samples (generated=True) with a '{config.label_field}' label in "
            "the view; generate them with mode='cells' so they carry the class label")
    if config.max_synthetic_fraction is not None:
        cap = int(config.max_synthetic_fraction * len(real))
        if len(gen) > cap:
            gen = np.sort(rng.choice(gen, size=cap, replace=False))
    keep = np.concatenate([real, gen])
    return data.subset(keep), len(np.flatnonzero(data.generated)) - len(gen)


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, dev, batch_size: int = 1024) -> float:
    net.eval()
    correct = 0
    for b in range(0, len(y), batch_size):
        correct += int((net(x[b:b + batch_size].to(dev)).argmax(1).cpu() == y[b:b + batch_size]).sum())
    return correct / max(1, len(y))


class _LfFWeights:
    """LfF's per-sample relative difficulty: EMA of both models' CE, normalised by the class maximum."""

    def __init__(self, labels: torch.Tensor, num_classes: int, alpha: float):
        self.labels, self.num_classes, self.alpha = labels, num_classes, alpha
        self.loss_b = torch.zeros(len(labels))
        self.loss_d = torch.zeros(len(labels))
        self.seen = torch.zeros(len(labels), dtype=torch.bool)

    def _update(self, store, idx, loss):
        old = store[idx]
        store[idx] = torch.where(self.seen[idx], self.alpha * old + (1 - self.alpha) * loss, loss)

    def __call__(self, idx: torch.Tensor, ce_b: torch.Tensor, ce_d: torch.Tensor) -> torch.Tensor:
        self._update(self.loss_b, idx, ce_b)
        self._update(self.loss_d, idx, ce_d)
        self.seen[idx] = True
        lb, ld = self.loss_b[idx].clone(), self.loss_d[idx].clone()
        for c in self.labels[idx].unique():
            in_c = self.labels == c
            at = self.labels[idx] == c
            lb[at] /= self.loss_b[in_c & self.seen].max().clamp_min(1e-8)
            ld[at] /= self.loss_d[in_c & self.seen].max().clamp_min(1e-8)
        return lb / (lb + ld + 1e-8)


def train_classifier(samples, config: TrainConfig, val_samples=None, device: str | None = None, progress=None,
                     make_loop=None) -> TrainedClassifier:
    """Train an image classifier on ``samples`` as ``config`` says (see the module docstring).

    ``config``'s defaults follow LfF's Colored MNIST protocol (Adam 1e-3,
    batch 256, 100 epochs; ``backbone="auto"`` = its 3x100 MLP for images up
    to 32 px, ResNet-18 above); ``classes``, ``image_size`` and ``backbone``
    are resolved from the data here (``config`` itself is not changed).
    ``val_samples``: a labelled view (e.g. an unbiased validation split) for
    model selection; without it the last epoch is kept. Samples without a
    label are skipped (``num_skipped``). Deterministic for a seed on the CPU;
    AMP on CUDA.
    """
    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    label_field, image_size, num_workers = config.label_field, config.image_size, config.num_workers
    data = labelled_samples(samples, label_field, config.classes)
    size = native_size(data.filepaths) if image_size is None else (
        [int(image_size)] * 2 if isinstance(image_size, (int, np.integer)) else [int(s) for s in image_size])
    config = replace(config, classes=data.classes, backbone=resolve_backbone(config.backbone, size), image_size=size,
                     mean=None, std=None, pretrained_weights=None, groups=None)
    config.validate()
    method, seed = config.method, config.seed
    if (config.method in ("group_dro", "dfr") or config.refit_head) and make_loop is None:
        what = "refit_head=True" if config.refit_head else f"method='{config.method}'"
        raise validation.FairBalanceError(f"{what} is trained through fairbalance.train_classifier")
    if config.pretrained and config.backbone == "resnet18":
        resnet18_weights()  # before any work
    gen = seed_everything(seed)
    data, filtered_out = drop_filtered_out(samples, data, config)
    data, excluded = select_training_samples(data, config, np.random.default_rng(seed))
    if len(set(data.labels.tolist())) < 2:
        raise validation.FairBalanceError(f"Only one class of '{label_field}' is present in this view")
    weights = _sample_weights(samples, data, config)
    val = None
    if val_samples is not None and len(val_samples):
        vdata = labelled_samples(val_samples, label_field, data.classes).real(required=False)
        if len(vdata.ids):
            val = (load_images(vdata.filepaths, size, num_workers=num_workers), torch.as_tensor(vdata.labels))
    config.model_selection = "best_val_accuracy" if val is not None else (
        "last_epoch (the validation view is empty)" if val_samples is not None else "last_epoch")
    x = load_images(data.filepaths, size, num_workers=num_workers, progress=False)
    if config.normalize == "dataset":
        config.mean, config.std = channel_stats(x)
    elif config.normalize == "imagenet":
        config.mean, config.std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    dev = distributed.device(device)
    progress = distributed.progress_for(progress)
    net, config.pretrained_weights = build_model(config)
    loop = _fit_lff if method == "lff" else _fit_single
    if method == "two_stage":
        loop = functools.partial(_fit_two_stage, generated=torch.as_tensor(data.generated))
    if make_loop is not None:  # recipes defined in their own module (train.group_robust), which imports this one;
        # they get this method's loop to wrap (refit_head: the loop, then DFR's last layer on val_samples)
        loop = make_loop(samples, data, config, val_samples, size, num_workers, loop)
    if method == "dfr" or config.refit_head:  # the validation view trains the last layer: nothing is selected on it
        val, config.model_selection = None, "last_epoch (val_samples train DFR's last layer)"
    history, best_epoch = loop(net, config, x, torch.as_tensor(data.labels), torch.as_tensor(weights).float(), val,
                               dev, gen, progress)
    return TrainedClassifier(net.eval().cpu(), config, history, data.num_unlabelled,
                             int(data.generated.sum()), excluded + filtered_out, best_epoch,
                             num_filtered_out=filtered_out)


def drop_filtered_out(samples, data: LabelledSamples, config: TrainConfig) -> tuple[LabelledSamples, int]:
    """The generated samples marked True in ``exclude_field`` left out (methods that use generated samples)."""
    mark = config.exclude_field
    if not trains_on_generated(config) or not mark or not samples._root_dataset.has_sample_field(mark):
        return data, 0
    marked = set(samples.select([i for i, g in zip(data.ids, data.generated) if g]).match({mark: True}).values("id"))
    if not marked:
        return data, 0
    keep = np.array([i not in marked for i in data.ids])
    return data.subset(np.flatnonzero(keep)), int((~keep).sum())


class _Selector:
    """Keeps the weights of the epoch with the best validation accuracy (or the last epoch)."""

    def __init__(self, val, dev):
        self.val, self.dev = val, dev
        self.best, self.state, self.epoch = -1.0, None, None

    def after_epoch(self, net, epoch: int, record: dict) -> None:
        if self.val is None:
            self.epoch = epoch
            return
        acc = _accuracy(net, self.val[0], self.val[1], self.dev)
        record["val_accuracy"] = acc
        if acc > self.best:
            self.best, self.epoch, self.state = acc, epoch, copy.deepcopy(net.state_dict())

    def finish(self, net) -> int:
        if self.state is not None:
            net.load_state_dict(self.state)
        return self.epoch


def _loader(x, y, w, batch_size, gen):
    """Shuffled mini-batches ``(x, y, w, positions)`` by tensor indexing (no per-item collation)."""
    order = torch.randperm(len(y), generator=gen)
    for b in range(0, len(y), batch_size):
        idx = order[b: b + batch_size]
        yield x[idx], y[idx], w[idx], idx


@dataclass
class _Slice(distributed.Shard):
    """This process's slice of a global batch, and the global batch's total sample weight."""

    weight: torch.Tensor | float = 1.0


def _shards(batches, dev):
    """This process's rows ``(x, y, w, slice)`` of each global batch, on ``dev`` (all rows without a launcher)."""
    for xb, yb, wb, ib in batches:
        sh = distributed.shard(len(yb))
        yield (xb[sh.part].to(dev), yb[sh.part].to(dev), wb[sh.part].to(dev),
               _Slice(sh.part, sh.total, wb.sum().clamp_min(1e-8).to(dev)))


def _fit_single(net, config: TrainConfig, x, y, w, val, dev, gen, progress):
    """One model, per-sample CE (GCE for ``biased``) times the sample weights."""
    import fiftyone.core.utils as fou

    net = net.to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    weighted = bool((w != 1).any())
    selector, history = _Selector(val, dev), []
    with fou.ProgressBar(total=config.epochs, progress=progress) as pb:
        for epoch in range(1, config.epochs + 1):
            net.train()
            total, count, correct = 0.0, 0, 0
            for xb, yb, wb, sh in _shards(_loader(x, y, w, config.batch_size, gen), dev):
                with torch.autocast(dev.type, enabled=dev.type == "cuda"):
                    logits = net(xb).float()
                per = gce_loss(logits, yb, config.q) if config.method == "biased" else F.cross_entropy(
                    logits, yb, reduction="none")
                loss = (per * wb).sum() / sh.weight if weighted else sh.mean(per)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                distributed.sum_gradients(net.parameters())
                scaler.step(opt)
                scaler.update()
                total += float(per.detach().sum())
                count += len(yb)
                correct += int((logits.argmax(1) == yb).sum())
            total, count, correct = distributed.sum_values(total, count, correct)
            record = {"epoch": epoch, "loss": total / count, "train_accuracy": correct / count}
            selector.after_epoch(net, epoch, record)
            history.append(record)
            pb.update()
    return history, selector.finish(net)


def _fit_lff(net, config: TrainConfig, x, y, w, val, dev, gen, progress):
    """Learning from Failure: a GCE-biased model and the debiased ``net`` trained side by side."""
    import fiftyone.core.utils as fou

    biased, _ = build_model(config)
    net, biased = net.to(dev), biased.to(dev)
    opt = torch.optim.Adam(list(net.parameters()) + list(biased.parameters()), lr=config.lr,
                           weight_decay=config.weight_decay)
    relative = _LfFWeights(y, len(config.classes), config.ema)
    selector, history = _Selector(val, dev), []
    with fou.ProgressBar(total=config.epochs, progress=progress) as pb:
        for epoch in range(1, config.epochs + 1):
            net.train()
            biased.train()
            total, count, correct, mean_w = 0.0, 0, 0, 0.0
            for xb, yb, wb, ib in _loader(x, y, w, config.batch_size, gen):
                sh = distributed.shard(len(yb))  # this process's rows; the weights are updated on all of them
                xb, yb, wb = xb[sh.part].to(dev), yb[sh.part].to(dev), wb[sh.part].to(dev)
                logit_b, logit_d = biased(xb).float(), net(xb).float()
                ce_b = F.cross_entropy(logit_b, yb, reduction="none").detach()
                ce_d = F.cross_entropy(logit_d, yb, reduction="none").detach()
                rel = relative(ib, distributed.gather_rows(ce_b, sh.total).cpu(),
                               distributed.gather_rows(ce_d, sh.total).cpu())[sh.part].to(dev)
                loss_d = F.cross_entropy(logit_d, yb, reduction="none") * rel * wb
                loss = sh.mean(loss_d) + sh.mean(gce_loss(logit_b, yb, config.q))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                distributed.sum_gradients(list(net.parameters()) + list(biased.parameters()))
                opt.step()
                total += float(ce_d.sum())
                count += len(yb)
                correct += int((logit_d.argmax(1) == yb).sum())
                mean_w += float(rel.sum())
            total, count, correct, mean_w = distributed.sum_values(total, count, correct, mean_w)
            record = {"epoch": epoch, "loss": total / count, "train_accuracy": correct / count,
                      "mean_lff_weight": mean_w / count}
            selector.after_epoch(net, epoch, record)
            history.append(record)
            pb.update()
    return history, selector.finish(net)


def supcon_loss(z: torch.Tensor, y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Per-anchor supervised contrastive loss (Khosla et al. 2020) on one view per sample.

    ``z``: projections (normalised here); the positives of an anchor are the
    other samples of its class in the batch. Anchors without a positive get 0.
    """
    z = F.normalize(z.float(), dim=1)
    n = len(y)
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye
    npos = pos.sum(1)
    per = -log_prob.masked_fill(~pos, 0.0).sum(1) / npos.clamp_min(1)
    return torch.where(npos > 0, per, torch.zeros_like(per))


def _fit_two_stage(net, config: TrainConfig, x, y, w, val, dev, gen, progress, generated=None):
    """Stage 1: encoder + head + projection on generated (+ real) samples, CE + SupCon; stage 2: the head on real."""
    import fiftyone.core.utils as fou

    net = net.to(dev)
    encoder, head = split_encoder_head(net)
    projector = nn.Sequential(nn.Linear(head.in_features, head.in_features), nn.ReLU(),
                              nn.Linear(head.in_features, config.projection_dim)).to(dev)
    stage1 = torch.ones(len(y), dtype=torch.bool) if config.stage1_real else generated.clone()
    real = ~generated
    selector, history = _Selector(val, dev), []
    with fou.ProgressBar(total=config.epochs + config.head_epochs, progress=progress) as pb:
        opt = torch.optim.Adam(list(net.parameters()) + list(projector.parameters()), lr=config.lr,
                               weight_decay=config.weight_decay)
        x1, y1, w1 = x[stage1], y[stage1], w[stage1]
        for epoch in range(1, config.epochs + 1):
            net.train()
            projector.train()
            total_ce = total_con = 0.0
            count = correct = 0
            for xb, yb, wb, sh in _shards(_loader(x1, y1, w1, config.batch_size, gen), dev):
                feats = encoder(xb)
                logits = head(feats).float()
                ce = F.cross_entropy(logits, yb, reduction="none")
                # SupCon's positives come from the whole global batch: every process's projections
                z = distributed.gather_rows(projector(feats), sh.total, differentiable=True)
                con = supcon_loss(z, distributed.gather_rows(yb, sh.total), config.supcon_temperature)[sh.part]
                per = ce + config.supcon_weight * con
                loss = (per * wb).sum() / sh.weight
                opt.zero_grad(set_to_none=True)
                loss.backward()
                distributed.sum_gradients(list(net.parameters()) + list(projector.parameters()))
                opt.step()
                total_ce += float(ce.detach().sum())
                total_con += float(con.detach().sum())
                count += len(yb)
                correct += int((logits.argmax(1) == yb).sum())
            total_ce, total_con, count, correct = distributed.sum_values(total_ce, total_con, count, correct)
            record = {"epoch": epoch, "stage": 1, "loss": total_ce / count, "supcon_loss": total_con / count,
                      "train_accuracy": correct / count, "num_samples": count}
            if val is not None:
                record["val_accuracy"] = _accuracy(net, val[0], val[1], dev)
            history.append(record)
            pb.update()
        # stage 2: the encoder frozen (eval mode: batch-norm statistics too), only the linear head trains
        for p in encoder.parameters():
            p.requires_grad_(False)
        encoder.eval()
        with torch.no_grad():
            xr = x[real]
            feats = torch.cat([encoder(xr[b:b + 1024].to(dev)) for b in range(0, len(xr), 1024)])
        yr, wr = y[real], w[real]
        opt = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        weighted = bool((wr != 1).any())
        for epoch in range(1, config.head_epochs + 1):
            head.train()
            total = 0.0
            count = correct = 0
            for fb_, yb, wb, sh in _shards(_loader(feats, yr, wr, config.batch_size, gen), dev):
                logits = head(fb_).float()
                per = F.cross_entropy(logits, yb, reduction="none")
                loss = (per * wb).sum() / sh.weight if weighted else sh.mean(per)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                distributed.sum_gradients(head.parameters())
                opt.step()
                total += float(per.detach().sum())
                count += len(yb)
                correct += int((logits.argmax(1) == yb).sum())
            total, count, correct = distributed.sum_values(total, count, correct)
            record = {"epoch": config.epochs + epoch, "stage": 2, "loss": total / count,
                      "train_accuracy": correct / count, "num_samples": count}
            selector.after_epoch(net, config.epochs + epoch, record)
            history.append(record)
            pb.update()
    for p in encoder.parameters():
        p.requires_grad_(True)
    return history, selector.finish(net)
