"""Balanced generation: what to generate per cluster or cell (``generate_balanced``), and its result.

``generate_balanced`` plans the images (the same number per cluster, fill up
to the largest cluster, or every class x attribute cell up to a count), then
runs the shared loop of :mod:`fairbalance.generate.engine`: batch -> images (temp file + rename) -> samples with
provenance -> run record. Every image has its own seed and file name, so
reruns are idempotent and an interrupted run resumes where it stopped; an
output folder holding another model's or setting's images is refused.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from fairbalance.core import runs, sharding, validation
from fairbalance.find import balance
from fairbalance.core.fields import label_path
from fairbalance.core.data import labelled_samples, load_images
from fairbalance.generate.diffusion_model import CONDITIONAL_DIFFUSION, ConditionalDiffusionModel
from fairbalance.generate.diffusion_sampling import TONE_MATCHES, sample_images, validate_sampling
from fairbalance.generate.engine import (GenerationJob, check_shard_args, generate_plan, real_samples,
                                         require_own_target)
from .engine import (GENERATED_FILE_PATTERNS, GENERATION_FILE, PROVENANCE_FIELDS, RESULT_CLASSES,  # noqa: F401
                     delete_generated, finish_generation, merge_shards, provenance_value, run_generation,
                     shard_generation, start_generation)


def plan_counts(counts: dict[str, int], mode: str = "equal", total: int | None = None,
                per_class: int | None = None) -> dict[str, int]:
    """How many images to generate per cluster (or per cell, for ``cells``).

    ``equal``: ``per_class`` each, or ``total // M`` each (the paper: 2000/M);
    ``fill``: up to the size of the largest cluster; ``cells``: every cell up
    to ``per_class`` images (real + generated).
    """
    m = len(counts)
    if mode == "equal":
        if per_class is None:
            if total is None:
                raise validation.FairBalanceError("mode='equal' needs total or per_class")
            if total < m:
                raise validation.FairBalanceError(f"total={total} is smaller than the {m} clusters")
            per_class = total // m
        validation.require_positive_int("per_class", per_class)
        return {c: per_class for c in counts}
    if mode == "fill":
        largest = max(counts.values())
        return {c: largest - n for c, n in counts.items()}
    if mode == "cells":
        if per_class is None:
            raise validation.FairBalanceError("mode='cells' needs per_cell: the images every cell should have")
        validation.require_positive_int("per_cell", per_class)
        return {c: max(0, per_class - n) for c, n in counts.items()}
    raise validation.FairBalanceError(f"mode must be 'equal', 'fill' or 'cells', not {mode!r}")


@dataclass
class _DiffusionInput:
    condition: tuple[int, ...]
    seed: int
    source: tuple[str, str] | None = None  # (sample id, filepath) of the image an edit starts from
    source_condition: tuple[int, ...] | None = None


def _cell_jobs(samples, diff: ConditionalDiffusionModel, per_cell: int, source: str, seed: int, output_dir: str):
    """Jobs that fill every class x attribute cell of the view's real samples up to ``per_cell``."""
    real = labelled_samples(samples, diff.label_field, diff.classes).real(required=False)
    attr = dict(zip(*samples.select(real.ids).values(["id", label_path(samples, diff.attribute_field)])))
    index = {a: j for j, a in enumerate(diff.attributes)}
    cells = np.array([[c, index.get(attr.get(i), -1)] for c, i in zip(real.labels, real.ids)])
    counts = {(ci, ai): int(np.sum((cells[:, 0] == ci) & (cells[:, 1] == ai)))
              for ci in range(len(diff.classes)) for ai in range(len(diff.attributes))}
    plan = plan_counts(counts, "cells", per_class=per_cell)
    jobs = []
    for (ci, ai), n in plan.items():
        candidates = np.flatnonzero((cells[:, 0] == ci) & (cells[:, 1] != ai) & (cells[:, 1] >= 0))
        if source == "edit" and n and not len(candidates):
            candidates = np.flatnonzero((cells[:, 0] == ci) & (cells[:, 1] >= 0))
        if source == "edit" and n and not len(candidates):
            raise validation.FairBalanceError(f"source='edit': no real image of class '{diff.classes[ci]}' to edit")
        c, a = diff.classes[ci], diff.attributes[ai]
        for i in range(n):
            img_seed = seed * 1_000_003 + ci * 100_003 + ai * 1_009 + i
            src = src_cond = None
            if source == "edit":
                j = candidates[np.random.default_rng([seed, ci, ai, i]).integers(len(candidates))]
                src, src_cond = (real.ids[j], real.filepaths[j]), (ci, int(cells[j, 1]))
            prov = {"seed": img_seed, "cell": f"{c}|{a}"}
            if src:
                prov.update(source_id=src[0], source_filepath=src[1])
            jobs.append(GenerationJob(os.path.join(output_dir, f"cell{ci}x{ai}_seed{seed}_{i:05d}.png"), f"{c}|{a}",
                                      {diff.label_field: c, diff.attribute_field: a}, prov,
                                      _DiffusionInput((ci, ai), img_seed, src, src_cond)))
    name = {cell: f"{diff.classes[cell[0]]}|{diff.attributes[cell[1]]}" for cell in plan}
    return jobs, {name[cell]: n for cell, n in plan.items()}, {name[cell]: n for cell, n in counts.items()}


def _cluster_jobs(samples, diff: ConditionalDiffusionModel, mode, total, per_class, seed, output_dir):
    """Jobs that balance the clusters of a single-condition model (``equal`` or ``fill``)."""
    from fiftyone import ViewField as Fv

    path = label_path(samples, diff.label_field)
    real = samples.match(Fv("generated") != True) if samples._root_dataset.has_field("generated") else samples  # noqa
    present = real.count_values(path)
    plan = plan_counts({c: present.get(c, 0) for c in diff.classes}, mode, total, per_class)
    jobs = []
    for ci, c in enumerate(diff.classes):
        for i in range(plan[c]):
            img_seed = seed * 1_000_003 + ci * 100_003 + i
            jobs.append(GenerationJob(os.path.join(output_dir, f"cluster{c}_seed{seed}_{i:05d}.png"), c,
                                      {diff.label_field: c}, {"seed": img_seed, "cell": c},
                                      _DiffusionInput((ci,), img_seed)))
    return jobs, plan, {c: int(present.get(c, 0)) for c in diff.classes}


@dataclass
class GenerationResult:
    """What a generator added: per group (cluster, cell, class) added and planned, where the images are.

    ``added`` counts what this call added; ``resumed``: an earlier call of
    the run made some of its images. The run's record counts the run's
    total (``added``, ``num_added``) and this call's (``num_added_now``).
    """

    run_key: str
    added: dict[str, int]
    planned: dict[str, int]
    output_dir: str
    target_dataset: str
    resumed: bool = False
    counts_before: dict[str, int] | None = None  # real samples per group, when the generator balances groups
    realism: dict | None = None  # real vs generated on a sample (fairbalance.generate.realism.quick_realism), when measured

    @property
    def num_added(self) -> int:
        return sum(self.added.values())

    @property
    def counts_after(self) -> dict[str, int] | None:
        """Real + generated per group: the counts before plus every generated sample of the plan (all runs)."""
        if self.counts_before is None:
            return None
        return {k: self.counts_before.get(k, 0) + self.planned.get(k, 0) for k in self.counts_before}

    def to_dict(self) -> dict:
        out = {**asdict(self), "num_added": self.num_added, "counts_after": self.counts_after}
        if self.realism is not None:  # flat too, for result panels
            out["two_sample_accuracy"] = self.realism.get("two_sample_accuracy")
            out["realism_warning"] = self.realism.get("warning")
        if self.counts_before is not None:
            out["entropy_before"] = balance.entropy(self.counts_before)
            out["entropy_after"] = balance.entropy(self.counts_after)
        return out


@runs.writer("generate_balanced", resumable=True)
def generate_balanced(
    samples,
    label_field: str = "sa_cluster",
    model: str | None = None,
    model_run: str | None = None,
    total: int | None = None,
    per_class: int | None = None,
    mode: str = "equal",
    per_cell: int | None = None,
    source: str = "noise",
    edit_strength: float = 0.5,
    guidance_scale: float = 3.0,
    attribute_guidance_scale: float | None = None,
    guidance_reference: str = "null",
    num_inference_steps: int = 50,
    scheduler: str = "ddim",
    inversion: bool = False,
    keep_background: bool = False,
    match_tone: str | None = None,
    output_dir: str | None = None,
    target_dataset=None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    run_key: str = "generate_balanced",
    overwrite: bool = False,
    shard: int | None = None,
    num_shards: int | None = None,
    chunk_size: int = sharding.DEFAULT_CHUNK_SIZE,
    progress=None,
    realism_sample: int = 500,
) -> GenerationResult | sharding.ShardResult:
    """Generate images per cluster, or per class x attribute cell, and add them with provenance.

    ``mode``: ``equal`` / ``fill`` balance the clusters of a model trained on
    one field (Suayama & Nakamura); ``cells`` fills every cell of a factorised
    model (``train_conditional_diffusion(..., attribute_field=...)``) up to
    ``per_cell`` images, real ones counted. ``source="edit"`` (cells only)
    starts each image from a real image of the same class with another
    attribute, noised to ``edit_strength`` of the schedule and denoised under
    the new condition, so the class's shape comes from a real image;
    ``"noise"`` samples from pure noise. ``guidance_reference``: ``"null"``
    (compositional classifier-free guidance, ``guidance_scale`` toward the
    class, ``attribute_guidance_scale`` toward the attribute) or, for edits,
    ``"source"`` (guide from the source image's own cell toward the asked
    one with ``attribute_guidance_scale``; see :func:`sample_images`).
    Edits that keep what must not change: ``inversion=True`` starts from
    the DDIM inversion of the source under its own cell instead of random
    noise (regenerating it under its own cell gives it back), and
    ``keep_background=True`` copies the source's background pixels into the
    result (no haze; needs a plain background, such as a digit's).
    ``match_tone="histogram"`` / ``"source"`` gives each edit its source's
    brightness (by rank, or pixel by pixel: a recolouring), hue and
    saturation kept, for attributes carried by colour (see
    :func:`~fairbalance.generate.diffusion_sampling.sample_images`).

    New samples get ``generated=True``, the condition's label field(s) (the
    class label for cells, so classifiers can train on them),
    ``generation`` (model, sampler, seed, cell, source sample) and the tag
    ``generated``. ``model``: the folder of :func:`train_conditional_diffusion`
    (or its result); or ``model_run``: the key of that training run.

    Image ``i`` of a cell always has the same seed, so rerunning the same
    run adds nothing twice and an interrupted run continues where it
    stopped. A run key or ``output_dir`` used by another model or setting
    is refused; ``overwrite=True`` deletes that run's (or folder's) images
    and samples first.

    ``shard, num_shards``: make only shard ``shard`` of ``num_shards`` of the
    planned images (image ``i`` of the plan goes to shard ``i % num_shards``;
    :func:`fairbalance.queue_sharded` queues all shards for delegated
    workers), in chunks of ``chunk_size`` images; a rerun skips the images
    done and the last shard to finish records the run (the same record as
    one unsharded run); returns a :class:`~fairbalance.core.sharding.ShardResult`.
    Sharded runs add their samples to the samples' own dataset.

    ``realism_sample``: up to this many of the run's generated images and
    of the view's real ones go through a small real-vs-generated
    discriminator (:func:`fairbalance.generate.realism.quick_realism`, seconds on a
    CPU); the result's ``realism`` (and ``two_sample_accuracy``: 0.5 =
    indistinguishable) report it, with a warning when the generated set is
    trivially separable (then a classifier trained on it learns "looks
    generated"; see :func:`fairbalance.measure_realism` and
    ``filter_generated(method="discriminator")``). 0 skips it; sharded runs
    do not measure it.
    """
    if isinstance(realism_sample, bool) or not isinstance(realism_sample, int) or realism_sample < 0:
        raise validation.FairBalanceError(f"realism_sample must be an integer >= 0, got {realism_sample!r}")
    sharded = check_shard_args(samples, target_dataset, shard, num_shards, overwrite)
    diff, jobs, plan, before, setting, provenance, config = _plan_balanced(
        samples, label_field, model, model_run, total, per_class, mode, per_cell, source, edit_strength,
        guidance_scale, attribute_guidance_scale, guidance_reference, num_inference_steps, scheduler, seed,
        batch_size, device, run_key, inversion, keep_background, match_tone)
    render = _diffusion_renderer(diff, provenance)
    result = generate_plan(samples, "generate_balanced", "generate_balanced", run_key, jobs, config, setting, render,
                           provenance, batch_size, GenerationResult, {"planned": plan, "counts_before": before},
                           target_dataset, output_dir, overwrite, sharded, shard, num_shards, chunk_size, progress)
    if not sharded and realism_sample:
        add_realism(samples, result, realism_sample, seed, device)
    return result


def add_realism(samples, result: GenerationResult, max_samples: int, seed: int = 0, device=None) -> None:
    """Measure the run's generated images against the view's real ones; store it in the result and its run."""
    import warnings

    import fiftyone as fo
    from fiftyone import ViewField as Fv

    from fairbalance.generate import realism

    target = fo.load_dataset(result.target_dataset)
    stored = runs.load_run_results(target, result.run_key)
    if result.num_added == 0 and stored.get("realism") is not None:  # nothing new: the run's figure stands
        result.realism = stored["realism"]
        return
    gen = target.match(Fv("generation.run_key") == result.run_key)
    real = real_samples(samples)
    if validation.count_samples(gen) == 0 or validation.count_samples(real) == 0:
        return
    result.realism = realism.quick_realism(real, gen, max_samples=max_samples, seed=seed, device=device)
    if result.realism.get("warning") and result.realism.get("two_sample_accuracy") is not None:
        warnings.warn(result.realism["warning"])
    figures = {k: v for k, v in result.to_dict().items() if k in ("realism", "two_sample_accuracy", "realism_warning")}
    # only the realism figures change: the record's counts describe the run, not this call
    runs.PreparedRun(target, result.run_key, "", {}, [], False).save_results({**stored, **figures})


def _plan_balanced(samples, label_field="sa_cluster", model=None, model_run=None, total=None, per_class=None,
                   mode="equal", per_cell=None, source="noise", edit_strength=0.5, guidance_scale=3.0,
                   attribute_guidance_scale=None, guidance_reference="null", num_inference_steps=50,
                   scheduler="ddim", seed=0, batch_size=64, device=None, run_key="generate_balanced",
                   inversion=False, keep_background=False, match_tone=None):
    """Every check of :func:`generate_balanced` and its plan (file names relative), before anything is claimed.

    Returns ``(model, jobs, planned, counts_before, setting, provenance, run config)``.
    """
    validation.require_nonempty(samples)
    validation.require_seed(seed)
    validation.require_device(device)
    for name, value in (("total", total), ("per_class", per_class), ("per_cell", per_cell)):
        if value is not None:
            validation.require_positive_int(name, value)
    if source not in ("noise", "edit"):
        raise validation.FairBalanceError(f"source must be 'noise' or 'edit', not {source!r}")
    validate_sampling(guidance_scale, num_inference_steps, scheduler, attribute_guidance_scale,
                      edit_strength if source == "edit" else None)
    validation.require_positive_int("batch_size", batch_size)
    diff = runs.recorded_model(samples, CONDITIONAL_DIFFUSION.name, model, model_run, "model (a model folder)",
                               "model_run", device)
    if diff.label_field != label_field:
        raise validation.FairBalanceError(f"The model was trained on '{diff.label_field}', not '{label_field}'")
    if (mode == "cells") != bool(diff.attribute_field):
        raise validation.FairBalanceError(
            "mode='cells' needs a model trained with attribute_field (class x attribute), and such a model "
            f"generates only cells; this model is conditioned on {[label_field, diff.attribute_field]}")
    if source == "edit" and mode != "cells":
        raise validation.FairBalanceError("source='edit' works with mode='cells'")
    if guidance_reference not in ("null", "source"):
        raise validation.FairBalanceError(f"guidance_reference must be 'null' or 'source', not {guidance_reference!r}")
    if guidance_reference == "source" and source != "edit":
        raise validation.FairBalanceError("guidance_reference='source' needs source='edit' (a source image)")
    for name, value in (("inversion", inversion), ("keep_background", keep_background)):
        if validation.require_bool(name, value) and source != "edit":
            raise validation.FairBalanceError(f"{name}=True edits a source image: it needs source='edit'")
    if match_tone is not None and match_tone not in TONE_MATCHES:
        raise validation.FairBalanceError(f"match_tone must be None or one of {TONE_MATCHES}, not {match_tone!r}")
    if match_tone is not None and source != "edit":
        raise validation.FairBalanceError("match_tone matches an edit to its source image: it needs source='edit'")
    setting = {"model": diff.folder, "model_step": diff.step, "label_field": label_field,
               "attribute_field": diff.attribute_field, "guidance_scale": guidance_scale,
               "attribute_guidance_scale": attribute_guidance_scale, "guidance_reference": guidance_reference,
               "num_inference_steps": num_inference_steps,
               "scheduler": scheduler, "source": source, "edit_strength": edit_strength if source == "edit" else None,
               # recorded only when on, so folders and runs made before these options still resume
               **({"inversion": True} if inversion else {}), **({"keep_background": True} if keep_background else {}),
               **({"match_tone": match_tone} if match_tone else {})}
    provenance = {**setting, "mode": mode, "run_key": run_key}
    if mode == "cells":  # planned (and checked) before anything is claimed or replaced; file names relative
        jobs, plan, before = _cell_jobs(samples, diff, per_cell, source, seed, "")
    else:
        jobs, plan, before = _cluster_jobs(samples, diff, mode, total, per_class, seed, "")
    config = {**provenance, "total": total, "per_class": per_class, "per_cell": per_cell, "seed": seed}
    return diff, jobs, plan, before, setting, provenance, config


def validate_inputs(samples, target_dataset=None, **kwargs) -> None:
    """The up-front checks of a sharded :func:`generate_balanced` (run by ``queue_sharded`` before queuing)."""
    require_own_target(samples, target_dataset)
    names = set(inspect.signature(_plan_balanced).parameters) - {"samples"}
    _plan_balanced(samples, **{**{k: v for k, v in kwargs.items() if k in names}, "device": "cpu"})


def _diffusion_renderer(diff: ConditionalDiffusionModel, provenance: dict) -> Callable[[list], list]:
    """Images for a batch of diffusion jobs: from noise, or edits of their source images."""
    size = diff.unet.config.sample_size

    def render(batch: list[GenerationJob]):
        inputs = [j.payload for j in batch]
        init = None
        if inputs[0].source is not None:
            init = load_images([d.source[1] for d in inputs], [size, size], scale="symmetric")
        reference = [d.source_condition for d in inputs] if provenance["guidance_reference"] == "source" else None
        return sample_images(diff, [d.condition for d in inputs], [d.seed for d in inputs],
                             provenance["guidance_scale"], provenance["num_inference_steps"],
                             provenance["scheduler"], provenance["attribute_guidance_scale"], init,
                             provenance["edit_strength"] if init is not None else None, reference,
                             inversion=bool(provenance.get("inversion")),
                             keep_background=bool(provenance.get("keep_background")),
                             match_tone=provenance.get("match_tone"),
                             inversion_labels=[d.source_condition for d in inputs] if init is not None else None)

    return render
