"""How real generated images look: a classifier two-sample test, train-on-generated / test-on-real, image statistics.

A generated set that a small classifier tells from the real one teaches a
downstream classifier "looks generated" next to the class: the repair then
fails on real test images however right the digits and colours are. So the
realism of a generated set is measured, not assumed:

- two-sample test (Lopez-Paz & Oquab 2017): a small discriminator (LfF's
  3x100 MLP, or a small CNN) trained to tell real from generated, its
  balanced accuracy on held-out folds (cross-fitted, every image scored by
  a model that did not train on it): 0.5 = indistinguishable, 1.0 =
  trivially separable;
- train on generated / test on real (TSTR) accuracy, beside the same
  classifier trained on as many real images (TRTR), when labels exist;
- per-set and per-cell (class x attribute) image statistics: mean
  intensity, background (border) intensity, stroke (foreground) fraction.

:func:`measure_realism` records a run; :func:`quick_realism` is the cheap
figure the generation result reports; :func:`discriminator_scores` gives
every generated image's out-of-fold p(real | x), which
:func:`fairbalance.filter_generated` (``method="discriminator"``) turns into
exclusions or density-ratio weights.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance.core import models, runs, validation
from fairbalance.core.data import load_images, native_size
from fairbalance.generate import realism_reference
from fairbalance.train import training

DISCRIMINATORS = ("mlp", "cnn")
SEPARABLE_ACCURACY = 0.9  # two-sample accuracy at or above which the generated set is called trivially separable


def _warning(accuracy: float) -> str | None:
    if accuracy < SEPARABLE_ACCURACY:
        return None
    return (f"A small discriminator tells the generated images from real ones with {accuracy:.1%} accuracy "
            "(0.5 = indistinguishable): a classifier trained on them can learn 'looks generated' instead of the "
            "class; check intensity/background statistics, or weight/exclude them with "
            "filter_generated(method='discriminator')")


def _fit(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, num_classes: int, backbone: str, epochs: int,
         seed: int, dev, batch_size: int = 64, lr: float = 1e-3) -> torch.nn.Module:
    """A small classifier on images in [0, 1], normalised with its training images' channel statistics."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net, _ = training.build_backbone(backbone, num_classes, tuple(x.shape[1:]))
        mean, std = training.channel_stats(x)
        net = torch.nn.Sequential(training.Normalize(mean, std), net).to(dev)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            net.train()
            order = torch.randperm(len(y), generator=gen)
            for b in range(0, len(y), batch_size):
                idx = order[b:b + batch_size]
                if len(idx) < 2 and backbone == "cnn":  # batch norm needs two
                    continue
                per = F.cross_entropy(net(x[idx].to(dev)), y[idx].to(dev), reduction="none")
                loss = (per * w[idx].to(dev)).sum() / w[idx].sum().to(dev)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.eval()


@torch.no_grad()
def _probs(net, x: torch.Tensor, dev) -> torch.Tensor:
    return torch.cat([F.softmax(net(x[b:b + 1024].to(dev)), 1).cpu() for b in range(0, len(x), 1024)])


def discriminator_scores(x_real: torch.Tensor, x_gen: torch.Tensor, folds: int = 5, epochs: int = 10,
                         backbone: str = "mlp", seed: int = 0, device=None,
                         real_weights: np.ndarray | None = None, step=None) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold p(real | x) of every real and every generated image (class-balanced loss: prior 0.5 each).

    Each image is scored by a discriminator trained on the other folds, so
    the scores are held-out; with the balanced loss, ``p / (1 - p)``
    estimates the density ratio p_real(x) / p_generated(x).
    ``real_weights``: importance weights of the real images (e.g. to give a
    reference the generated set's cell mix); each side still weighs half.
    ``step``: called after each fold (a progress bar's ``update``).
    """
    dev = models.resolve_device(device)
    x = torch.cat([x_real, x_gen])
    y = torch.cat([torch.ones(len(x_real), dtype=torch.long), torch.zeros(len(x_gen), dtype=torch.long)])
    base = torch.ones(len(y), dtype=torch.float32)
    if real_weights is not None:
        base[:len(x_real)] = torch.as_tensor(np.asarray(real_weights, dtype=np.float32))
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for side in (np.arange(len(x_real)), len(x_real) + np.arange(len(x_gen))):  # stratified folds
        fold[side] = rng.permutation(len(side)) % folds
    p_real = np.empty(len(y))
    for k in range(folds):
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        yt, bt = y[train], base[train]
        side = torch.zeros(2).index_add_(0, yt, bt).clamp_min(1e-12)  # each side's total weight
        w = bt * (len(yt) / (2 * side))[yt]
        net = _fit(x[train], yt, w, 2, backbone, epochs, seed * 1009 + k, dev)
        p_real[test] = _probs(net, x[test], dev)[:, 1].numpy()
        if step is not None:
            step()
    return p_real[:len(x_real)], p_real[len(x_real):]


def two_sample_accuracy(p_real_of_real: np.ndarray, p_real_of_gen: np.ndarray,
                        real_weights: np.ndarray | None = None) -> float:
    """Balanced held-out accuracy of the discriminator (0.5 = indistinguishable, 1.0 = separable); the real
    side's accuracy weighted by ``real_weights`` when given."""
    real_hit = np.average(np.asarray(p_real_of_real) > 0.5, weights=real_weights)
    return float(0.5 * (real_hit + np.mean(p_real_of_gen <= 0.5)))


def image_statistics(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image: mean intensity, background (the border ring's mean) and foreground fraction, all in [0, 1].

    Foreground: pixels farther than 0.2 (max over channels) from the
    border's median colour, e.g. a digit's stroke on its background.
    """
    n, _, h, w = x.shape
    r = max(1, min(h, w) // 16)
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[r:h - r, r:w - r] = False
    border = x[:, :, ring]  # n x 3 x m
    bg = border.median(dim=2).values[:, :, None, None]
    fg = ((x - bg).abs().amax(dim=1) > 0.2).float().mean(dim=(1, 2))
    return {"mean_intensity": x.mean(dim=(1, 2, 3)).numpy(), "background_intensity": border.mean(dim=(1, 2)).numpy(),
            "foreground_fraction": fg.numpy()}


def _summary(stats: dict[str, np.ndarray], keep=None) -> dict[str, float]:
    keep = slice(None) if keep is None else keep
    out = {k: float(np.mean(v[keep])) for k, v in stats.items()}
    out["count"] = int(len(next(iter(stats.values()))[keep]))
    return out


def _capped(ids: list, limit: int | None, seed: int) -> np.ndarray:
    idx = np.arange(len(ids))
    if limit is not None and len(idx) > limit:
        idx = np.sort(np.random.default_rng(seed).choice(idx, limit, replace=False))
    return idx


def _load(samples, fields: list[str], limit, seed, size=None):
    values = samples.values(["filepath"] + fields)
    keep = _capped(values[0], limit, seed)
    rows = [[col[j] for j in keep] for col in values]
    size = size or native_size(rows[0][:1])
    return rows, size


def quick_realism(real_samples, generated_samples, max_samples: int = 500, epochs: int = 10, folds: int = 2,
                  seed: int = 0, device=None) -> dict:
    """The cheap figure a generation result reports: two-sample accuracy on a sample, mean intensities, a warning.

    No run is recorded (the generation's own run stores it).
    """
    (rp,), size = _load(real_samples, [], max_samples, seed)
    (gp,), _ = _load(generated_samples, [], max_samples, seed + 1, size)
    if len(rp) < folds or len(gp) < folds:
        return {"two_sample_accuracy": None, "num_real": len(rp), "num_generated": len(gp),
                "warning": "too few images to measure realism"}
    xr, xg = (load_images(p, size, progress=False) for p in (rp, gp))
    pr, pg = discriminator_scores(xr, xg, folds, epochs, "mlp", seed, device)
    acc = two_sample_accuracy(pr, pg)
    sr, sg = image_statistics(xr), image_statistics(xg)
    return {"two_sample_accuracy": acc, "num_real": len(rp), "num_generated": len(gp),
            "real_mean_intensity": float(sr["mean_intensity"].mean()),
            "generated_mean_intensity": float(sg["mean_intensity"].mean()),
            "real_background_intensity": float(sr["background_intensity"].mean()),
            "generated_background_intensity": float(sg["background_intensity"].mean()),
            "warning": _warning(acc)}


@dataclass
class RealismResult:
    """How far a generated set is from the real one (see :mod:`fairbalance.generate.realism`)."""

    run_key: str
    two_sample_accuracy: float  # balanced, held out; 0.5 = indistinguishable
    num_real: int
    num_generated: int
    discriminator: str
    tstr_accuracy: float | None = None  # trained on the generated images, tested on real ones
    trtr_accuracy: float | None = None  # the same classifier trained on as many real images, same test
    num_tstr_train: int | None = None
    num_tstr_test: int | None = None
    real_statistics: dict = field(default_factory=dict)
    generated_statistics: dict = field(default_factory=dict)
    cell_statistics: dict = field(default_factory=dict)  # cell -> {"real": {...}, "generated": {...}}
    intensity_ratio: float | None = None  # generated mean intensity / real mean intensity
    warnings: list = field(default_factory=list)
    # against ``reference_samples`` (None without one): the same test, the real side being the reference
    reference_two_sample_accuracy: float | None = None
    reference_num_real: int | None = None  # reference images with a weight (in a generated cell, if matched)
    reference_num_generated: int | None = None  # generated images measured (those of matched cells, if matched)
    reference_cells_matched: int | None = None  # match_cells: generated cells the reference has images of
    reference_cells_total: int | None = None  # match_cells: class x attribute cells of the generated set
    reference_intensity_ratio: float | None = None  # generated mean intensity / the (weighted) reference's

    @property
    def separable(self) -> bool:
        return self.two_sample_accuracy >= SEPARABLE_ACCURACY

    def to_dict(self) -> dict:
        return {**asdict(self), "separable": self.separable}


def _cells(labels: list, attrs: list | None) -> list:
    def name(v):
        return None if v is None else str(v)

    if attrs is None:
        return [name(c) for c in labels]
    return [None if c is None or a is None else f"{c}|{a}" for c, a in zip(labels, attrs)]


def _tstr(xg, yg, xr, yr, xt, yt, epochs, seed, dev, step=None) -> tuple[float, float, int]:
    """Accuracy on (xt, yt) of an MLP trained on the generated images, and on as many real ones."""
    classes = sorted({*yg, *yt, *yr})
    index = {c: j for j, c in enumerate(classes)}
    n = min(len(yg), len(yr))
    rng = np.random.default_rng(seed)
    out = []
    for x, y in ((xg, yg), (xr, yr)):
        keep = np.sort(rng.choice(len(y), n, replace=False))
        yy = torch.tensor([index[y[j]] for j in keep])
        net = _fit(x[keep], yy, torch.ones(len(yy)), len(classes), "mlp", epochs, seed, dev)
        pred = _probs(net, xt, dev).argmax(1).numpy()
        out.append(float(np.mean(pred == np.array([index[c] for c in yt]))))
        if step is not None:
            step()
    return out[0], out[1], n


@runs.writer("realism")
def measure_realism(
    real_samples,
    generated_samples=None,
    label_field: str | None = "ground_truth",
    attribute_field: str | None = None,
    test_samples=None,
    max_samples: int | None = 2000,
    discriminator: str = "mlp",
    folds: int = 5,
    epochs: int = 10,
    tstr_epochs: int = 20,
    seed: int = 0,
    device: str | None = None,
    run_key: str = "realism",
    overwrite: bool = False,
    reference_samples=None,
    match_cells: bool = False,
    progress=None,
) -> RealismResult:
    """Measure how well a generated set passes for real: two-sample test, TSTR, image statistics; record a run.

    ``generated_samples=None``: the ``generated == True`` samples of
    ``real_samples`` are the generated set and the others the real one.
    ``label_field`` (None to skip TSTR): the class label both sets carry;
    the TSTR classifier (LfF's MLP, ``tstr_epochs``) trains on the
    generated images and is tested on ``test_samples`` (e.g. an unbiased
    test split; default: a held-out half of the real images), beside the
    same classifier trained on as many real images. ``attribute_field``:
    statistics per class x attribute cell as well. At most ``max_samples``
    images per set (a seeded sample). The two-sample accuracy is balanced
    and cross-fitted over ``folds``; at or above 0.9 the result warns.

    ``reference_samples``: real samples held out from both sets (e.g. an
    unbiased split) for a second two-sample figure,
    ``reference_two_sample_accuracy``, beside the one against
    ``real_samples``: a biased training set lacks the bias-conflicting cells
    a repair generates, so against it even real images of those cells are
    told apart. ``match_cells=True`` (needs ``label_field`` and
    ``attribute_field`` on all three) weights the reference so that each
    class x attribute cell has its share of the generated set; generated
    images of cells the reference lacks are left out of that figure
    (``reference_cells_matched`` of ``reference_cells_total``).

    Every refusal comes before any run is written or any image loaded
    (:func:`check_realism` gives them without running). ``progress``: a
    FiftyOne progress callback, one step per discriminator fold and per
    TSTR / TRTR classifier.
    """
    import fiftyone.core.utils as fou

    plan = _plan(real_samples, generated_samples, label_field, attribute_field, test_samples, max_samples,
                 discriminator, folds, epochs, tstr_epochs, seed, reference_samples, match_cells)
    real_samples, generated_samples, size, reference = (plan[k] for k in ("real", "generated", "size", "reference"))
    (rp, rl), (gp, gl) = plan["real_rows"], plan["generated_rows"]
    folds, epochs, tstr_epochs, max_samples = (plan[k] for k in ("folds", "epochs", "tstr_epochs", "max_samples"))
    run = runs.prepare(real_samples, run_key, "realism", {
        "label_field": label_field, "attribute_field": attribute_field, "max_samples": max_samples,
        "discriminator": discriminator, "folds": folds, "epochs": epochs, "tstr_epochs": tstr_epochs, "seed": seed,
        "real_view": real_samples._pipeline(), "generated_dataset": generated_samples._root_dataset.name,
        "generated_view": generated_samples._pipeline(),
        "test_view": None if test_samples is None else test_samples._pipeline(), "image_size": size,
        **_where("reference", reference_samples), "match_cells": match_cells}, [], overwrite)
    steps = folds * (1 if reference is None else 2) + (2 if label_field else 0)
    with fou.ProgressBar(total=steps, progress=progress) as pb:
        xr, xg = (load_images(p, size, progress=False) for p in (rp, gp))
        pr, pg = discriminator_scores(xr, xg, folds, epochs, discriminator, seed, device, step=pb.update)
        acc = two_sample_accuracy(pr, pg)
        sr, sg = image_statistics(xr), image_statistics(xg)
        result = RealismResult(run_key, acc, len(rp), len(gp), discriminator, real_statistics=_summary(sr),
                               generated_statistics=_summary(sg))
        real_mean = result.real_statistics["mean_intensity"]
        result.intensity_ratio = (float(result.generated_statistics["mean_intensity"] / real_mean) if real_mean > 0
                                  else None)
        if label_field:
            result.cell_statistics.update(_cell_statistics(rl, gl, attribute_field, sr, sg))
            _tstr_figures(result, xr, xg, rl[0], gl[0], test_samples, label_field, max_samples, seed, size,
                          tstr_epochs, device, pb.update)
        _add_warnings(result)
        if reference is not None:
            _reference_figures(result, reference, xg, discriminator, folds, epochs, seed, device, pb.update)
    run.write(lambda: None)
    run.save_results(result.to_dict())
    return result


def check_realism(real_samples, generated_samples=None, **kwargs) -> dict:
    """What :func:`measure_realism` with these arguments would compare, or its refusal (``FairBalanceError``):
    the same checks, loading no image and writing nothing (the App's form runs them before Execute).

    Returns the numbers of real and generated images compared (after the
    ``max_samples`` cap) and, with a reference, of reference images that
    count and of generated cells matched. The run key is not checked here.
    """
    bound = inspect.signature(measure_realism).bind(real_samples, generated_samples, **kwargs)
    bound.apply_defaults()
    p = _plan(*(bound.arguments[n] for n in inspect.signature(_plan).parameters))
    out = {"num_real": len(p["real_rows"][0]), "num_generated": len(p["generated_rows"][0])}
    ref = p["reference"]
    if ref is not None:
        out.update(reference_num_real=int((ref["weights"] > 0).sum()), reference_num_generated=int(
            ref["gen_keep"].sum()), reference_cells_matched=ref["matched"], reference_cells_total=ref["total"])
    return out


def _plan(real_samples, generated_samples, label_field, attribute_field, test_samples, max_samples, discriminator,
          folds, epochs, tstr_epochs, seed, reference_samples, match_cells) -> dict:
    """Every refusal of :func:`measure_realism`, in its order: the checked settings, both sets' files and labels
    (their values, no image read), the reference's plan."""
    from fiftyone import ViewField as Fv

    if discriminator not in DISCRIMINATORS:
        raise validation.FairBalanceError(f"discriminator must be one of {DISCRIMINATORS}, not {discriminator!r}")
    folds = validation.require_positive_int("folds", folds, 2)
    epochs = validation.require_positive_int("epochs", epochs)
    tstr_epochs = validation.require_positive_int("tstr_epochs", tstr_epochs)
    validation.require_seed(seed)
    if max_samples is not None:
        max_samples = validation.require_positive_int("max_samples", max_samples, 2 * folds)
    validation.require_nonempty(real_samples)
    if generated_samples is None:
        validation.require_fields(real_samples, ["generated"])
        generated_samples = real_samples.match(Fv("generated") == True)  # noqa: E712
        real_samples = real_samples.match(Fv("generated") != True)  # noqa: E712
        _require_some(real_samples, "real", "the view has only generated samples (generated == True)")
        _require_some(generated_samples, "generated", "the view has no sample with generated == True")
    _require_some(generated_samples, "generated", "select the generated samples to measure")
    fields = _check_views(real_samples, generated_samples, test_samples, label_field, attribute_field)
    paths = [f"{f}.label" for f in fields]
    (rp, *rl), size = _load(real_samples, paths, max_samples, seed)
    (gp, *gl), _ = _load(generated_samples, paths, max_samples, seed + 1, size)
    for name, n in (("real", len(rp)), ("generated", len(gp))):
        if n < folds:
            raise validation.FairBalanceError(f"{n} {name} image(s): the two-sample test needs at least {folds}")
    if set(rp) & set(gp):
        raise validation.FairBalanceError("The real and generated views share images: pass two disjoint sets")
    realism_reference.check(reference_samples, real_samples, generated_samples, label_field, attribute_field,
                            match_cells)
    reference = None if reference_samples is None else _reference_plan(
        reference_samples, gl, len(gp), paths if match_cells else [], max_samples, seed, size, folds)
    return {"real": real_samples, "generated": generated_samples, "folds": folds, "epochs": epochs,
            "tstr_epochs": tstr_epochs, "max_samples": max_samples, "real_rows": (rp, rl),
            "generated_rows": (gp, gl), "size": size, "reference": reference}


def _require_some(samples, side: str, hint: str) -> None:
    if not len(samples.limit(1)):
        raise validation.FairBalanceError(f"No {side} samples to compare: {hint}")


def _check_views(real_samples, generated_samples, test_samples, label_field, attribute_field) -> list[str]:
    """The label / attribute fields every view must carry (returned), and a usable test split."""
    fields = [f for f in (label_field, attribute_field) if f]
    for view in (real_samples, generated_samples) + ((test_samples,) if test_samples is not None else ()):
        validation.require_fields(view, fields)
    if test_samples is not None:
        validation.require_nonempty(test_samples)
        if label_field is None:
            raise validation.FairBalanceError("test_samples is for the TSTR accuracy: it needs a label_field")
    return fields


def _where(name: str, view) -> dict:
    """A view's dataset and stages, for the run config (None for no view)."""
    return {f"{name}_dataset": None if view is None else view._root_dataset.name,
            f"{name}_view": None if view is None else view._pipeline()}


def _add_warnings(result) -> None:
    """Trivially separable (against ``real_samples``), or not as bright as the real images."""
    warning = _warning(result.two_sample_accuracy)
    if warning:
        result.warnings.append(warning)
    if result.intensity_ratio is not None and not 0.8 <= result.intensity_ratio <= 1.25:
        result.warnings.append(f"Generated images are {result.intensity_ratio:.2f}x as bright as real ones on average")


def _cell_statistics(rl, gl, attribute_field, sr, sg) -> dict:
    """The image statistics of each class (x attribute) cell, real and generated."""
    rcells = _cells(rl[0], rl[1] if attribute_field else None)
    gcells = _cells(gl[0], gl[1] if attribute_field else None)
    out = {}
    for cell in sorted({c for c in rcells + gcells if c is not None}):
        entry = {}
        for side, cells, stats in (("real", rcells, sr), ("generated", gcells, sg)):
            keep = np.array([c == cell for c in cells])
            if keep.any():
                entry[side] = _summary(stats, keep)
        out[cell] = entry
    return out


def _tstr_figures(result, xr, xg, yr, yg, test_samples, label_field, max_samples, seed, size, tstr_epochs,
                  device, step=None) -> None:
    """TSTR and TRTR accuracies into ``result``: on ``test_samples``, or on a held-out half of the labelled real
    images."""
    rlab = np.array([c is not None for c in yr])
    glab = np.array([c is not None for c in yg])
    if test_samples is not None:
        (tp, tl), _ = _load(test_samples, [f"{label_field}.label"], max_samples, seed + 2, size)
        tkeep = [j for j, c in enumerate(tl) if c is not None]
        xt, yt = load_images([tp[j] for j in tkeep], size, progress=False), [tl[j] for j in tkeep]
        train_real = np.flatnonzero(rlab)
    else:  # a held-out half of the labelled real images
        order = np.random.default_rng(seed).permutation(np.flatnonzero(rlab))
        test_idx, train_real = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2:])
        xt, yt = xr[test_idx], [yr[j] for j in test_idx]
    gidx = np.flatnonzero(glab)
    if len(yt) and len(gidx) and len(train_real):
        result.tstr_accuracy, result.trtr_accuracy, result.num_tstr_train = _tstr(
            xg[gidx], [yg[j] for j in gidx], xr[train_real], [yr[j] for j in train_real], xt, yt, tstr_epochs,
            seed, models.resolve_device(device), step)
        result.num_tstr_test = len(yt)


def _reference_plan(reference_samples, gl, num_gen, paths, max_samples, seed, size, folds) -> dict:
    """Which reference images count and with which weight (``match_cells``: ``paths`` are the label and
    attribute fields), which generated images are measured; refused when too few are left."""
    (fp, *fl), _ = _load(reference_samples, paths, max_samples, seed + 3, size)
    plan = {"paths": fp, "weights": np.ones(len(fp)), "gen_keep": np.ones(num_gen, dtype=bool), "matched": None,
            "total": None, "size": size}
    note = ""
    if paths:
        w, keep, matched, total = realism_reference.cell_weights(_cells(fl[0], fl[1]), _cells(gl[0], gl[1]))
        plan.update(weights=w, gen_keep=keep, matched=matched, total=total)
        note = f" ({matched} of {total} generated cells have reference images)"
    n_ref, n_gen = int((plan["weights"] > 0).sum()), int(plan["gen_keep"].sum())
    if min(n_ref, n_gen) < folds:
        raise validation.FairBalanceError(
            f"{n_ref} reference and {n_gen} generated image(s) can be compared{note}: the two-sample test "
            f"needs at least {folds} on each side")
    return plan


def _reference_figures(result, plan, xg, discriminator, folds, epochs, seed, device, step=None) -> None:
    """The two-sample test of the generated images against the (weighted) reference, into ``result``."""
    use = plan["weights"] > 0
    w = plan["weights"][use]
    xf = load_images([p for p, u in zip(plan["paths"], use) if u], plan["size"], progress=False)
    xk = xg[torch.as_tensor(plan["gen_keep"])]
    pr, pg = discriminator_scores(xf, xk, folds, epochs, discriminator, seed, device, real_weights=w, step=step)
    result.reference_two_sample_accuracy = two_sample_accuracy(pr, pg, real_weights=w)
    result.reference_num_real, result.reference_num_generated = int(use.sum()), len(xk)
    result.reference_cells_matched, result.reference_cells_total = plan["matched"], plan["total"]
    ref_mean = float(np.average(image_statistics(xf)["mean_intensity"], weights=w))
    gen_mean = float(image_statistics(xk)["mean_intensity"].mean())
    result.reference_intensity_ratio = gen_mean / ref_mean if ref_mean > 0 else None
    if result.reference_two_sample_accuracy >= SEPARABLE_ACCURACY:
        result.warnings.append(f"Against the reference samples too, a discriminator tells the generated images "
                               f"apart ({result.reference_two_sample_accuracy:.1%} accuracy)")
