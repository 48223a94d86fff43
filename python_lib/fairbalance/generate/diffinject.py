"""DiffInject: bias-conflicting samples by content injection in a diffusion model's h-space.

Ko et al. (2024), after InjectFusion (Jeong et al. 2024). The images a
GCE-biased classifier gets wrong (:func:`fairbalance.compute_hardness_tags`)
are the *contents*; random untagged real images are the *originals*. Both
are inverted to x_T by DDIM inversion; the original is then regenerated
while, over the first steps [T, t_edit] of the reverse process, the UNet
bottleneck h (the output of ``unet.mid_block``) of the original is replaced
by ``Slerp(h_orig, h_content / ||h_content|| * ||h_orig||, gamma)``, where
h_content comes from the content's own reverse trajectory: over all of h
(``injection="global"``) or inside a spatial mask on h (``"local"``). Each
of those steps is the paper's asymmetric step (eq. 7): x0 is predicted with
the edited h, the direction to x_t with the original h. Steps at or below
``t_boost`` add DDPM-like noise (eta = 1: the paper's quality boosting).

The model is a :func:`fairbalance.train_conditional_diffusion` model used
without its condition (the null row of every factor; it is trained with
condition dropout, and ``cond_drop_prob=1.0`` trains the paper's
unconditional model). The injected images join the dataset through the
shared generation loop (:func:`fairbalance.generate.engine.run_generation`) with
provenance, and carry the label of the sample chosen by ``label_from``.
DDIM on the model and its h-space (inversion, the reverse pass, the hook) are
in :mod:`fairbalance.generate.hspace`.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance.core import runs, sharding, validation
from fairbalance.core.data import labelled_samples, load_images
from fairbalance.generate.diffusion_model import CONDITIONAL_DIFFUSION
from fairbalance.generate.hspace import (  # noqa: F401  (also diffinject.<name>: DDIM and h-space)
    DDIMPath, HSpaceHook, content_trajectory, ddim_invert, ddim_reverse, h_shape, slerp_h)
from fairbalance.generate.engine import GenerationJob, check_shard_args, generate_plan, require_own_target
from fairbalance.generate.generation import GenerationResult

INJECTIONS = ("local", "global")
LABEL_SOURCES = ("content", "original")
FILE_PREFIX = "inject"


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------- inputs


def default_local_mask(shape: tuple[int, int]) -> np.ndarray:
    """``injection="local"`` without a mask: the h cells inside the central half of the image (a box).

    The cells whose centre lies within the middle 50% of the height and
    width (3 x 3 of a 7 x 7 h for 28 px images): where a centred object is.
    """
    out = np.zeros(shape, dtype=np.float32)
    for axis, n in enumerate(shape):
        centres = (np.arange(n) + 0.5) / n
        keep = (centres >= 0.25) & (centres <= 0.75)
        if axis == 0:
            out[keep, :] += 1
        else:
            out[:, keep] += 1
    return (out == 2).astype(np.float32)


def _mask_tensor(mask, injection: str, hshape: tuple[int, int], image_size: int) -> torch.Tensor | None:
    """The h-space mask (1 x 1 x h x w) from a mask at h's size or at the image size (area-averaged)."""
    if injection == "global":
        if mask is not None:
            raise validation.FairBalanceError("mask is used by injection='local' only; pass injection='local'")
        return None
    if mask is None:
        return torch.from_numpy(default_local_mask(hshape))[None, None]
    try:
        m = np.asarray(mask, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise validation.FairBalanceError(f"mask must be a 2-D array of numbers in [0, 1]: {e}") from e
    accepted = (tuple(hshape), (image_size, image_size))
    if m.shape not in accepted:
        raise validation.FairBalanceError(
            f"mask has shape {m.shape}; it must be {hshape[0]}x{hshape[1]} (the model's h-space) or "
            f"{image_size}x{image_size} (its image size)")
    if not np.isfinite(m).all() or m.min() < 0 or m.max() > 1:
        raise validation.FairBalanceError("mask values must be finite and in [0, 1]")
    if m.max() == 0:
        raise validation.FairBalanceError("mask is all zero: nothing would be injected")
    t = torch.from_numpy(m)[None, None]
    if m.shape != tuple(hshape):
        t = F.adaptive_avg_pool2d(t, hshape)
    return t


def _number(name: str, value, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
        raise validation.FairBalanceError(f"{name} must be a finite number, got {value!r}")
    if value < low or (high is not None and value > high):
        raise validation.FairBalanceError(
            f"{name} must be in [{low}, {high}], got {value!r}" if high is not None else f"{name} must be > {low}, got {value!r}")
    return float(value)


def _int(name: str, value, minimum: int) -> int:
    return validation.require_positive_int(name, value, minimum=minimum)


@dataclass
class _Pair:
    index: int
    original: tuple[str, str, str]  # id, filepath, label
    content: tuple[str, str, str]
    seed: int


def plan_pairs(samples, label_field: str, content_tag: str, ratio: float, seed: int
               ) -> tuple[list[_Pair], int, int]:
    """``round(ratio x real labelled samples)`` (original, content) pairs, deterministic for ``seed``.

    Contents are the real samples tagged ``content_tag``, each used in turn
    (a new random order every round); originals are random untagged real
    samples whose label differs from the content's (a pair of one class
    would give another image of that class's usual look). Returns the pairs
    and the numbers of contents and originals.
    """
    real = labelled_samples(samples, label_field).real()
    tagged = set(samples.match_tags(content_tag).values("id"))
    contents = [j for j, i in enumerate(real.ids) if i in tagged]
    if not contents:
        raise validation.FairBalanceError(
            f"No real sample of the view with a '{label_field}' label is tagged '{content_tag}': tag the "
            "bias-conflicting samples first (compute_hardness_tags)")
    originals = np.array([j for j, i in enumerate(real.ids) if i not in tagged])
    if not len(originals):
        raise validation.FairBalanceError(f"Every labelled sample is tagged '{content_tag}': no original to inject into")
    n = int(round(ratio * len(real.ids)))
    if n < 1:
        raise validation.FairBalanceError(
            f"ratio={ratio} of {len(real.ids)} real samples is less than one image; raise the ratio")
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(contents) for _ in range(math.ceil(n / len(contents)))])[:n]
    labels = real.labels
    pairs = []
    for i, c in enumerate(order):
        pool = originals[labels[originals] != labels[c]]
        if not len(pool):
            raise validation.FairBalanceError(
                f"No untagged original of another class than '{real.classes[labels[c]]}' to inject into")
        o = int(pool[rng.integers(len(pool))])
        pairs.append(_Pair(i, (real.ids[o], real.filepaths[o], real.classes[labels[o]]),
                           (real.ids[c], real.filepaths[c], real.classes[labels[c]]),
                           seed * 1_000_003 + i))
    return pairs, len(contents), len(originals)


# ----------------------------------------------------------------------------- the public function


@dataclass
class InjectionResult(GenerationResult):
    """What :func:`inject_bias_conflicting` added (per label), from how many contents and originals."""

    num_contents: int = 0
    num_originals: int = 0
    label_from: str = "content"
    model_dir: str = ""


@runs.writer("diffinject", resumable=True)
def inject_bias_conflicting(
    samples,
    model: str | None = None,
    model_run: str | None = None,
    content_tag: str = "bias_conflicting",
    label_field: str = "ground_truth",
    ratio: float = 0.1,
    gamma: float = 0.9,
    injection: str = "local",
    mask=None,
    t_edit: int = 400,
    t_boost: int = 200,
    num_inference_steps: int = 20,
    label_from: str = "content",
    output_dir: str | None = None,
    target_dataset=None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    run_key: str = "diffinject",
    overwrite: bool = False,
    shard: int | None = None,
    num_shards: int | None = None,
    chunk_size: int = sharding.DEFAULT_CHUNK_SIZE,
    progress=None,
) -> InjectionResult | sharding.ShardResult:
    """DiffInject: synthetic bias-conflicting samples by h-space content injection (see the module docstring).

    ``samples``: the real training view; its samples tagged ``content_tag``
    (the error set of :func:`fairbalance.compute_hardness_tags`) are the
    contents, the untagged ones the originals. ``round(ratio x real
    labelled samples)`` images are made (the paper's "bias-conflict ratio",
    0.1 for Colored MNIST), each from a random original of another class
    and the next content. ``model``: a folder of
    :func:`fairbalance.train_conditional_diffusion` (or its result), or
    ``model_run``: the key of that training run; it is used unconditionally
    (the null condition). Images of another size than the model's are
    resized to it (and the injected images have the model's size).

    ``gamma`` in [0, 1]: how much of the content's h is injected (0 = the
    original's reconstruction). ``injection``: ``"local"`` (inside ``mask``:
    an array at h's spatial size or at the image size, values in [0, 1];
    default the central box of :func:`default_local_mask`) or ``"global"``.
    ``t_edit`` (timesteps of the model's ``T``, 1000): the injection runs
    over [T, t_edit]; ``t_boost``: steps at or below it add noise; ``0 <=
    t_boost < t_edit < T``. ``label_from``: which sample's
    ``label_field`` label the image carries: ``"content"`` (default, the
    paper's) or ``"original"``. Measured on real Colored MNIST with the
    benchmark's 900-step model (README): the injected image mostly keeps
    the original's digit (55%, the content's 9%) *and* its colour (76%),
    so with the original's label it is a bias-aligned sample (24.5% show a
    colour other than their label's usual one); with the content's label
    98% do, the samples the method is meant to add, at the cost of a
    digit that matches the label in only 9%. The reverse pass is
    unconditional: conditioning it on the content's class gives the
    content's digit (90%) but in that class's usual colour (83%; the class
    embedding carries the bias), a bias-aligned sample again.

    New samples get ``generated=True``, the tag ``generated``, the label and
    ``generation`` (original and content ids, gamma, t_edit, t_boost,
    injection, model folder and step, seed). Every pair has its own seed and
    file, so a rerun adds nothing twice and an interrupted run resumes; a
    run key or ``output_dir`` holding another setting's images is refused
    unless ``overwrite=True`` (which deletes that run's images and samples).

    ``shard, num_shards``: make only shard ``shard`` of ``num_shards`` of the
    planned pairs (pair ``i`` to shard ``i % num_shards``), as
    :func:`fairbalance.generate.generation.generate_balanced` does (see there).
    """
    sharded = check_shard_args(samples, target_dataset, shard, num_shards, overwrite)
    prep = _prepare(samples, model, model_run, content_tag, label_field, ratio, gamma, injection, mask, t_edit, t_boost,
                    num_inference_steps, label_from, seed, batch_size, device, run_key)
    diff, path, hook, size, mask_t, pairs, num_contents, num_originals, setting, provenance, config = prep
    gamma, t_edit, t_boost = config["gamma"], config["t_edit"], config["t_boost"]
    try:
        jobs = []
        for p in pairs:
            label = p.content[2] if label_from == "content" else p.original[2]
            jobs.append(GenerationJob(
                f"{FILE_PREFIX}_seed{seed}_{p.index:05d}.png", label, {label_field: label},
                {"seed": p.seed, "pair": p.index, "original_id": p.original[0], "original_label": p.original[2],
                 "content_id": p.content[0], "content_label": p.content[2], "original_filepath": p.original[1],
                 "content_filepath": p.content[1]}, p))
        planned: dict[str, int] = {}
        for j in jobs:
            planned[j.key] = planned.get(j.key, 0) + 1
        render = _renderer(path, hook, size, gamma, mask_t, t_edit, t_boost)
        return generate_plan(
            samples, "inject_bias_conflicting", "diffinject", run_key, jobs, config, setting, render, provenance,
            batch_size, InjectionResult,
            {"planned": planned, "counts_before": None, "num_contents": num_contents, "num_originals": num_originals,
             "label_from": label_from, "model_dir": diff.folder},
            target_dataset, output_dir, overwrite, sharded, shard, num_shards, chunk_size, progress)
    finally:
        hook.remove()


def _prepare(samples, model=None, model_run=None, content_tag="bias_conflicting", label_field="ground_truth",
             ratio=0.1, gamma=0.9, injection="local", mask=None, t_edit=400, t_boost=200, num_inference_steps=20,
             label_from="content", seed=0, batch_size=64, device=None, run_key="diffinject"):
    """Every check of :func:`inject_bias_conflicting` and its pairs, before anything is claimed or written.

    Returns ``(model, DDIM path, h hook, image size, h mask, pairs, number of contents, of originals, setting,
    provenance, run config)``; the caller removes the hook.
    """
    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    runs.validate_run_key(run_key)
    gamma = _number("gamma", gamma, 0.0, 1.0)
    ratio = _number("ratio", ratio, 0.0)
    if ratio <= 0:
        raise validation.FairBalanceError(f"ratio must be > 0, got {ratio!r}")
    validation.require_at_most("ratio", ratio)
    if injection not in INJECTIONS:
        raise validation.FairBalanceError(f"injection must be one of {INJECTIONS}, not {injection!r}")
    if label_from not in LABEL_SOURCES:
        raise validation.FairBalanceError(f"label_from must be one of {LABEL_SOURCES}, not {label_from!r}")
    validation.require_tag("content_tag", content_tag)
    t_boost = _int("t_boost", t_boost, 0)
    t_edit = _int("t_edit", t_edit, 0)
    validation.require_positive_int("num_inference_steps", num_inference_steps)
    validation.require_positive_int("batch_size", batch_size)
    _int("seed", seed, 0)
    validation.require_fields(samples, [label_field])
    diff = runs.recorded_model(samples, CONDITIONAL_DIFFUSION.name, model, model_run, "model (a model folder)",
                               "model_run", device)
    path = DDIMPath(diff, num_inference_steps)
    T = path.num_train_timesteps
    if not t_boost < t_edit < T:
        raise validation.FairBalanceError(
            f"t_edit must be in ({t_boost} = t_boost, {T} = T) and t_boost < t_edit; got t_edit={t_edit}, "
            f"t_boost={t_boost}")
    if path.timesteps[0] < t_edit:
        raise validation.FairBalanceError(
            f"t_edit={t_edit}: with num_inference_steps={num_inference_steps} the first step is at "
            f"t={path.timesteps[0]}, so no step would inject; lower t_edit or raise num_inference_steps")
    hook = HSpaceHook(diff.unet)
    try:
        size = int(diff.unet.config.sample_size)
        hshape = h_shape(path, hook)
        mask_t = _mask_tensor(mask, injection, hshape, size)
        pairs, num_contents, num_originals = plan_pairs(samples, label_field, content_tag, ratio, seed)
    except BaseException:
        hook.remove()
        raise
    fingerprint = hashlib.sha1("\n".join(
        f"{p.original[0]}\t{p.content[0]}\t{p.seed}" for p in pairs).encode()).hexdigest()
    mask_list = None if mask_t is None else [[round(float(v), 6) for v in row] for row in mask_t[0, 0].tolist()]
    mask_id = None if mask_list is None else hashlib.sha1(repr(mask_list).encode()).hexdigest()[:12]
    setting = {"generator": "diffinject", "model": diff.folder, "model_step": diff.step, "gamma": gamma,
               "injection": injection, "mask_sha1": mask_id, "t_edit": t_edit, "t_boost": t_boost,
               "num_inference_steps": num_inference_steps, "condition": "null", "label_field": label_field,
               "label_from": label_from, "content_tag": content_tag, "pairs_sha1": fingerprint}
    provenance = {**setting, "run_key": run_key}
    config = {**provenance, "ratio": ratio, "seed": seed, "num_pairs": len(pairs), "mask": mask_list,
              "h_shape": list(hshape)}
    return (diff, path, hook, size, mask_t, pairs, num_contents, num_originals, setting, provenance, config)


def validate_inputs(samples, target_dataset=None, **kwargs) -> None:
    """The up-front checks of a sharded :func:`inject_bias_conflicting` (run by ``queue_sharded`` before queuing)."""
    require_own_target(samples, target_dataset)
    names = set(inspect.signature(_prepare).parameters) - {"samples"}
    hook = _prepare(samples, **{**{k: v for k, v in kwargs.items() if k in names}, "device": "cpu"})[2]
    hook.remove()


def _renderer(path: DDIMPath, hook: HSpaceHook, size: int, gamma: float, mask: torch.Tensor | None, t_edit: int,
              t_boost: int):
    """Images for a batch of pairs: contents inverted and traced once (cached), originals inverted and injected."""
    cache: dict[str, list[torch.Tensor]] = {}

    def render(batch: list[GenerationJob]):
        pairs = [j.payload for j in batch]
        todo = sorted({p.content[1] for p in pairs} - set(cache))
        if todo:
            x = load_images(todo, [size, size], scale="symmetric")
            hs = content_trajectory(path, hook, ddim_invert(path, x), t_edit)
            for k, p in enumerate(todo):
                cache[p] = [h[k: k + 1] for h in hs]
        x = load_images([p.original[1] for p in pairs], [size, size], scale="symmetric")
        content_h = [torch.cat([cache[p.content[1]][i] for p in pairs]) for i in range(len(cache[pairs[0].content[1]]))]
        out = ddim_reverse(path, hook, ddim_invert(path, x), content_h=content_h, gamma=gamma, mask=mask,
                           t_edit=t_edit, t_boost=t_boost, seeds=[p.seed for p in pairs])
        return _to_uint8(out)

    return render
