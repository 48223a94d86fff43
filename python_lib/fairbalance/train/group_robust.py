"""Group-robust training on real or discovered groups: GroupDRO and Deep Feature Reweighting.

The groups are the (class, ``group_field`` value) pairs of the samples, so a
bias attribute (``color``) and discovered slices (``slice`` of
:func:`fairbalance.discover_slices`, already per class) both work.

- ``group_dro`` (Sagawa et al. 2020, online algorithm): the loss is the
  group losses weighted by ``q``; after each batch ``q_g <- q_g *
  exp(dro_step * loss_g)`` for the groups in it, renormalised, so the worst
  groups weigh most; batches are drawn group-balanced (with replacement), as
  in the paper's released runs.
- ``dfr`` (Kirichenko et al. 2023): train the whole model with plain
  cross-entropy on ``samples``, then keep its features and refit only the
  last layer on the held-out ``val_samples``: L1 logistic regression on
  standardised features with group-balanced sample weights, fitted to
  convergence (no ``head_epochs``), the regularisation ``C`` chosen from
  ``DFR_C_GRID`` on half of each group by worst-group accuracy on the other
  halves (see ``DFR_C_GRID`` for where this departs from the paper's draws). The validation
  view is then training data, so no epoch is selected on it.

Single process (not under ``accelerate launch``): both methods refuse a launcher.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance.core import distributed, validation
from fairbalance.train.network import check_refit_head

METHODS = ("group_dro", "dfr")


def group_values(samples, ids: list[str], group_field: str, what: str) -> list[str]:
    """The ``group_field`` value of every sample of ``ids`` (as text); an error naming how many have none."""
    from fairbalance.core.fields import label_path

    path = label_path(samples, group_field)
    by_id = dict(zip(*samples.values(["id", path])))
    values = [by_id.get(i) for i in ids]
    missing = sum(v is None for v in values)
    if missing:
        raise validation.FairBalanceError(
            f"{missing} of the {len(ids)} {what} have no '{group_field}': every sample needs a group "
            "(discover_slices writes one on every labelled sample)")
    return [str(v) for v in values]


def group_index(labels: np.ndarray, values: list[str], classes: list[str]) -> tuple[np.ndarray, list[str]]:
    """Group index per sample and the group names ``"<class>|<value>"``, sorted."""
    names = sorted({f"{classes[c]}|{v}" for c, v in zip(labels, values)})
    index = {n: j for j, n in enumerate(names)}
    return np.array([index[f"{classes[c]}|{v}"] for c, v in zip(labels, values)], dtype=int), names


def check(method: str, group_field: str | None, dro_step: float, val_samples, refit_head: bool = False) -> None:
    """Up-front checks of the group-robust settings and ``refit_head`` (before the run is prepared)."""
    check_refit_head(method, refit_head)
    if method in METHODS and not group_field:
        raise validation.FairBalanceError(f"method='{method}' needs group_field (e.g. 'slice' or a bias attribute)")
    if group_field and method not in METHODS and not refit_head:
        raise validation.FairBalanceError(
            f"group_field is used by method='group_dro' or 'dfr', or with refit_head=True, not by {method!r} alone")
    if group_field:
        validation.require_field_name(group_field)
    if isinstance(dro_step, bool) or not (isinstance(dro_step, (int, float)) and np.isfinite(dro_step)
                                          and dro_step > 0):
        raise validation.FairBalanceError(f"dro_step must be a finite number > 0, got {dro_step!r}")
    what = f"method='{method}'" if method == "dfr" or not refit_head else "refit_head=True"
    if (method == "dfr" or refit_head) and (val_samples is None or not len(val_samples)):
        raise validation.FairBalanceError(
            f"{what} retrains the last layer on a held-out split: pass val_samples (labelled"
            + (", with group_field" if group_field else "") + "), disjoint from the training samples")
    if (method in METHODS or refit_head) and distributed.world_size() > 1:
        raise validation.FairBalanceError(f"{what} runs in one process, not under a launcher")


def fit_group_dro(net, config, x, y, w, val, dev, gen, progress, groups=None, num_groups=None):
    """GroupDRO's online algorithm; sample weights multiply the per-sample losses as in the other methods."""
    import fiftyone.core.utils as fou

    from fairbalance.train import training

    net = net.to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    q = torch.full((num_groups,), 1.0 / num_groups, device=dev)
    g_all = torch.as_tensor(groups)
    draw = 1.0 / torch.bincount(g_all, minlength=num_groups).double()[g_all]
    selector, history = training._Selector(val, dev), []
    with fou.ProgressBar(total=config.epochs, progress=progress) as pb:
        for epoch in range(1, config.epochs + 1):
            net.train()
            total, count, correct = 0.0, 0, 0
            # group-balanced draws (Sagawa et al.'s released runs, ``reweight_groups``): every group is seen
            # about equally often, so its weight follows its loss, not its size
            order = torch.multinomial(draw, len(y), replacement=True, generator=gen)
            for b in range(0, len(y), config.batch_size):
                idx = order[b:b + config.batch_size]
                xb, yb, wb, gb = x[idx].to(dev), y[idx].to(dev), w[idx].to(dev), g_all[idx].to(dev)
                logits = net(xb).float()
                per = F.cross_entropy(logits, yb, reduction="none") * wb
                onehot = F.one_hot(gb, num_groups).float()
                counts = onehot.sum(0)
                group_loss = (onehot * per[:, None]).sum(0) / counts.clamp_min(1)
                with torch.no_grad():
                    q = q * torch.exp(config.dro_step * group_loss.detach() * (counts > 0))
                    q = q / q.sum()
                loss = (q * group_loss).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(per.detach().sum())
                count += len(yb)
                correct += int((logits.argmax(1) == yb).sum())
            record = {"epoch": epoch, "loss": total / count, "train_accuracy": correct / count,
                      "max_group_weight": float(q.max()), "worst_group": int(q.argmax()),
                      "group_weights": [round(float(v), 6) for v in q.cpu()]}
            selector.after_epoch(net, epoch, record)
            history.append(record)
            pb.update()
    return history, selector.finish(net)


#: DFR's head (Kirichenko et al. 2023, their released code: L1 logistic regression on standardised features,
#: the inverse regularisation C chosen on one half of the held-out split by worst-group accuracy on the other).
#: The paper averages fits on 10 draws of ``min group size`` samples per group; discovered groups can hold one or
#: two held-out samples, which leaves 30-60 images a draw, so the head is fitted once on every held-out sample
#: with group-balanced weights instead (each group weighs the same in total: the expectation of those draws).
DFR_C_GRID = (1.0, 0.7, 0.3, 0.1, 0.07, 0.03, 0.01)


def _l1_logistic(c: float):
    """A binary L1 logistic regression (liblinear, as DFR's code), in the spelling of the installed scikit-learn."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    l1 = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    return LogisticRegression(C=c, solver="liblinear", **l1)


def balanced_weights(groups: np.ndarray) -> np.ndarray:
    """Per-sample weights under which every group weighs the same in total (mean 1)."""
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return w * len(w) / w.sum()


def _fit_head(feats: np.ndarray, labels: np.ndarray, groups: np.ndarray, c: float, classes: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Weights and bias (``classes`` rows, one-vs-rest) of group-balanced L1 logistic regressions."""
    weights = balanced_weights(groups)
    coef, intercept = np.zeros((classes, feats.shape[1])), np.zeros(classes)
    for k in np.unique(labels):
        lr = _l1_logistic(c).fit(feats, labels == k, sample_weight=weights)
        coef[k], intercept[k] = lr.coef_[0], lr.intercept_[0]
    return coef, intercept


def _worst_group_accuracy(feats, labels, groups, coef, intercept) -> float:
    pred = (feats @ coef.T + intercept).argmax(1)
    return min(float((pred[groups == g] == labels[groups == g]).mean()) for g in np.unique(groups))


def choose_c(feats: np.ndarray, labels: np.ndarray, groups: np.ndarray, classes: int, seed: int
             ) -> tuple[float, float | None]:
    """DFR's C: fitted on a random half of each group's held-out samples, scored by worst-group accuracy on the
    other halves (groups of one sample are only fitted on). Fewer than two groups to score: the grid's first C,
    ``None`` as its score."""
    rng = np.random.default_rng(seed)
    fit = np.zeros(len(labels), bool)
    for g in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        fit[members[: (len(members) + 1) // 2]] = True
    if len(np.unique(groups[~fit])) < 2 or len(np.unique(labels[fit])) < classes:
        return DFR_C_GRID[0], None
    scores = {c: _worst_group_accuracy(feats[~fit], labels[~fit], groups[~fit],
                                       *_fit_head(feats[fit], labels[fit], groups[fit], c, classes))
              for c in DFR_C_GRID}
    best = max(DFR_C_GRID, key=lambda c: (scores[c], -DFR_C_GRID.index(c)))
    return best, scores[best]


def fit_dfr(net, config, x, y, w, val, dev, gen, progress, held_out=None, held_groups=None, base=None):
    """ERM (or ``base``, another method's loop: ``refit_head``) on the training samples, then the last layer alone
    refitted on group-balanced held-out samples."""
    from fairbalance.train import training

    history, _ = (base or training._fit_single)(net, config, x, y, w, None, dev, gen, progress)
    xv, yv = held_out
    encoder, head = training.split_encoder_head(net)
    encoder.eval()
    with torch.no_grad():
        feats = torch.cat([encoder(xv[b:b + 1024].to(dev)).float().cpu() for b in range(0, len(xv), 1024)]).numpy()
    labels = yv.numpy()
    mean, std = feats.mean(0), feats.std(0) + 1e-8
    z = (feats - mean) / std
    classes = head.out_features
    c, tuned = choose_c(z, labels, held_groups, classes, config.seed)
    coef, intercept = _fit_head(z, labels, held_groups, c, classes)
    with torch.no_grad():  # the standardisation folded into the layer: w (f - mean) / std + b
        weight = torch.as_tensor(coef / std, dtype=head.weight.dtype)
        head.weight.copy_(weight.to(head.weight.device))
        head.bias.copy_(torch.as_tensor(intercept - (coef / std) @ mean, dtype=head.bias.dtype).to(head.bias.device))
    counts = np.unique(held_groups, return_counts=True)[1]
    pred = (z @ coef.T + intercept).argmax(1)
    history.append({"epoch": config.epochs + 1, "stage": "dfr_head", "C": c, "tuning_worst_group_accuracy": tuned,
                    "smallest_group": int(counts.min()), "num_groups": len(counts), "num_samples": int(counts.sum()),
                    "train_accuracy": float((pred == labels).mean())})
    return history, config.epochs + 1


def loop_for(samples, data, config, val_samples, size, num_workers, loop=None):
    """The training loop of ``config.method`` with its groups bound (``loop``, the method's own, for the others);
    with ``refit_head``, that loop followed by DFR's last-layer refit on ``val_samples``."""
    import functools

    if config.method == "group_dro":
        values = group_values(samples, data.ids, config.group_field, "training samples")
        groups, names = group_index(data.labels, values, data.classes)
        config.groups = names
        loop = functools.partial(fit_group_dro, groups=groups, num_groups=len(names))
    if config.method == "dfr" or config.refit_head:
        held, groups, names = _held_out(data, config, val_samples, size, num_workers)
        if config.method != "group_dro":  # group_dro + refit_head records its training groups
            config.groups = names
        base = None if config.method == "dfr" else loop
        return functools.partial(fit_dfr, held_out=held, held_groups=groups, base=base)
    return loop


def _held_out(data, config, val_samples, size, num_workers):
    """DFR's held-out images and labels, their group index and group names (classes alone without a group field)."""
    from fairbalance.core.data import labelled_samples, load_images

    vdata = labelled_samples(val_samples, config.label_field, data.classes).real()
    overlap = set(vdata.ids) & set(data.ids)
    if overlap:
        raise validation.FairBalanceError(
            f"{len(overlap)} sample(s) are in both the training view and val_samples: DFR's held-out split "
            "must be disjoint from the training samples")
    missing = sorted(set(data.classes) - {data.classes[k] for k in set(np.asarray(vdata.labels).tolist())})
    if missing:
        raise validation.FairBalanceError(
            f"DFR refits the last layer on val_samples, which have no sample of class(es) {missing}: "
            "the held-out split needs every class the model predicts")
    values = group_values(val_samples, vdata.ids, config.group_field, "held-out samples") if config.group_field \
        else ["all"] * len(vdata.ids)
    groups, names = group_index(vdata.labels, values, data.classes)
    held = (load_images(vdata.filepaths, size, num_workers=num_workers), torch.as_tensor(vdata.labels))
    return held, groups, names
