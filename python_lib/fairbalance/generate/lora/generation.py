"""Group-balanced generation with the per-group LoRA adapters of :func:`fairbalance.finetune_per_group`.

:func:`generate_per_group` generates the same number of images per group
(or fills every group up), switching to each group's adapter (or cluster's,
for Clustered DreamBooth) on one base model (:mod:`fairbalance.generate.lora.adapters`), and
adds them with their provenance. What to generate goes through the one
shared loop of :mod:`fairbalance.generate.engine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fairbalance.core import runs, sharding, validation
from fairbalance.core.data import load_images
from fairbalance.generate.engine import GenerationJob, check_shard_args, generate_plan, require_own_target
from fairbalance.generate.generation import GenerationResult, plan_counts
from fairbalance.generate.lora.adapters import (GROUP_ADAPTERS, GroupAdapters, model_condition, real_groups, activate,
                                                group_key, require_peft)


@dataclass
class _Input:
    adapter: str | None
    condition: tuple[int, ...] | None
    seed: int
    prompt: str | None = None
    source: str | None = None  # filepath of the image an edit starts from
    source_condition: tuple[int, ...] | None = None


@runs.writer("generate_per_group", resumable=True)
def generate_per_group(
    samples,
    adapters=None,
    finetune_run: str | None = None,
    base_model=None,
    mode: str = "equal",
    per_group: int | None = None,
    total: int | None = None,
    groups: str = "observed",
    source: str = "noise",
    edit_strength: float = 0.5,
    guidance_scale: float = 3.0,
    attribute_guidance_scale: float | None = None,
    guidance_reference: str = "null",
    num_inference_steps: int = 25,
    scheduler: str = "ddim",
    height: int | None = None,
    width: int | None = None,
    output_dir: str | None = None,
    target_dataset=None,
    seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
    run_key: str = "generate_per_group",
    overwrite: bool = False,
    shard: int | None = None,
    num_shards: int | None = None,
    chunk_size: int = sharding.DEFAULT_CHUNK_SIZE,
    progress=None,
) -> GenerationResult | sharding.ShardResult:
    """Generate a group-balanced set with the adapters of :func:`finetune_per_group` and add it with provenance.

    ``adapters``: the folder (or result) of :func:`finetune_per_group`, or
    ``finetune_run``: the key of that run. ``mode``: ``equal`` (``per_group``
    images per group, or ``total`` split equally) or ``fill`` (every group
    up to the largest, or up to ``per_group`` when given, real images
    counted). A group of several clusters splits its images over its
    clusters in proportion to their sizes. ``groups="all"`` (a conditional
    base whose condition fields are the group fields) also fills the
    groups without real images, with the base model alone (no adapter).
    ``source="edit"`` (conditional base, ``lora`` adapters) starts each
    image from a real image of the same class noised to ``edit_strength``
    (see :func:`fairbalance.generate_balanced`). Every sample gets
    ``generated=True``, the group's field values and ``generation``
    (adapter, token, cluster, seed, base model); image ``i`` of a cluster
    always has the same seed and file, so a rerun adds nothing twice and an
    interrupted run resumes. ``base_model``: load the adapters onto this base
    instead of the recorded one (refused when it is another model).

    ``shard, num_shards``: make only shard ``shard`` of ``num_shards`` of the
    planned images (image ``i`` to shard ``i % num_shards``), as
    :func:`fairbalance.generate.generation.generate_balanced` does (see there).
    """
    sharded = check_shard_args(samples, target_dataset, shard, num_shards, overwrite)
    loaded, jobs, plan, counts, setting, provenance, config = _plan_per_group(
        samples, adapters, finetune_run, base_model, mode, per_group, total, groups, source, edit_strength,
        guidance_scale, attribute_guidance_scale, guidance_reference, num_inference_steps, scheduler, height, width,
        seed, batch_size, device, run_key)
    base = loaded.base
    render = _conditional_renderer(loaded, provenance) if base.kind == "conditional" else _sd_renderer(
        loaded, provenance)
    try:
        return generate_plan(samples, "generate_per_group", "generate_per_group", run_key, jobs, config, setting,
                             render, provenance, batch_size, GenerationResult, {"planned": plan, "counts_before": counts},
                             target_dataset, output_dir, overwrite, sharded, shard, num_shards, chunk_size, progress)
    finally:
        activate(base.unet, None)


def _plan_per_group(samples, adapters=None, finetune_run=None, base_model=None, mode="equal", per_group=None,
                    total=None, groups="observed", source="noise", edit_strength=0.5, guidance_scale=3.0,
                    attribute_guidance_scale=None, guidance_reference="null", num_inference_steps=25,
                    scheduler="ddim", height=None, width=None, seed=0, batch_size=32, device=None,
                    run_key="generate_per_group"):
    """Every check of :func:`generate_per_group` and its plan (file names relative), before anything is claimed.

    Returns ``(adapters, jobs, planned, counts_before, setting, provenance, run config)``.
    """
    from fairbalance.generate.diffusion_sampling import validate_sampling

    require_peft()
    validation.require_nonempty(samples)
    validation.require_seed(seed)
    validation.require_device(device)
    for name, value in (("per_group", per_group), ("total", total)):
        if value is not None:
            validation.require_positive_int(name, value)
    if mode not in ("equal", "fill"):
        raise validation.FairBalanceError(f"mode must be 'equal' or 'fill', not {mode!r}")
    if mode == "equal" and per_group is None and total is None:
        raise validation.FairBalanceError("mode='equal' needs per_group (images per group) or total")
    if groups not in ("observed", "all"):
        raise validation.FairBalanceError(f"groups must be 'observed' or 'all', not {groups!r}")
    if source not in ("noise", "edit"):
        raise validation.FairBalanceError(f"source must be 'noise' or 'edit', not {source!r}")
    if guidance_reference not in ("null", "source"):
        raise validation.FairBalanceError(f"guidance_reference must be 'null' or 'source', not {guidance_reference!r}")
    if guidance_reference == "source" and source != "edit":
        raise validation.FairBalanceError("guidance_reference='source' needs source='edit' (a source image)")
    validate_sampling(guidance_scale, num_inference_steps, scheduler, attribute_guidance_scale,
                      edit_strength if source == "edit" else None)
    validation.require_positive_int("batch_size", batch_size)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            validation.require_positive_int(name, value, minimum=8)
    loaded = runs.recorded_model(samples, GROUP_ADAPTERS.name, adapters, finetune_run, "adapters (a folder)",
                                 "finetune_run", device, base_model=base_model)
    base, cfg = loaded.base, loaded.config
    fields = list(cfg["group_fields"])
    method = cfg["method"]
    if base.kind != "conditional" and (source == "edit" or groups == "all"):
        raise validation.FairBalanceError("source='edit' and groups='all' need a conditional base model")
    if base.kind == "conditional":
        need = [base.diff.label_field] + ([base.diff.attribute_field] if base.diff.attribute_field else [])
        if source == "edit" and method != "lora":
            raise validation.FairBalanceError("source='edit' works with method='lora' adapters (a condition)")
        if groups == "all" and sorted(fields) != sorted(need):
            raise validation.FairBalanceError(
                f"groups='all' needs adapters grouped by exactly the model's condition fields {need}, not {fields}")
    ids, paths, values, _ = real_groups(samples, fields)
    counts = {}
    for v in values:
        counts[group_key(v)] = counts.get(group_key(v), 0) + 1
    by_group = loaded.by_group()
    group_values = {a["group"]: a["group_values"] for a in loaded.adapters}
    if groups == "all":
        d = base.diff
        for c in d.classes:
            for a in (d.attributes or [None]):
                vals = {d.label_field: c, **({d.attribute_field: a} if a is not None else {})}
                key = group_key(vals[f] for f in fields)
                counts.setdefault(key, 0)
                group_values.setdefault(key, vals)
    else:
        counts = {k: n for k, n in counts.items() if k in by_group}
        missing = sorted(set(by_group) - set(counts))
        for k in missing:  # adapters of groups absent from this view: balanced from zero real images
            counts[k] = 0
    if not counts:
        raise validation.FairBalanceError("No group of the view has an adapter")
    plan = plan_counts(counts, "cells" if mode == "fill" and per_group is not None else mode, total, per_group)
    if base.kind == "conditional" and method != "lora":
        lacking = [k for k, n in plan.items() if n and k not in by_group]
        if lacking:
            raise validation.FairBalanceError(f"groups {lacking[:5]} have no adapter to generate them with")
    # the sources of edits: real images of each class, with their own condition
    class_sources = {}
    if source == "edit":
        d = base.diff
        rids, rpaths, rvals, _ = real_groups(samples, need)
        for p, v in zip(rpaths, rvals):
            cond = model_condition(d, dict(zip(need, v)))
            if cond is not None:
                class_sources.setdefault(cond[0], []).append((p, cond))
    setting = {"adapters": loaded.folder, "base_model": base.name, "base_fingerprint": base.fingerprint,
               "adapter_method": method, "guidance_scale": guidance_scale,
               "attribute_guidance_scale": attribute_guidance_scale, "guidance_reference": guidance_reference,
               "num_inference_steps": num_inference_steps, "scheduler": scheduler, "source": source,
               "edit_strength": edit_strength if source == "edit" else None, "height": height, "width": width}
    provenance = {**setting, "run_key": run_key}
    jobs = _plan_jobs(plan, by_group, group_values, base, source, class_sources, seed)
    config = {**provenance, "mode": mode, "per_group": per_group, "total": total, "groups": groups, "seed": seed}
    return loaded, jobs, plan, counts, setting, provenance, config


def _plan_jobs(plan: dict, by_group: dict, group_values: dict, base, source: str, class_sources: dict,
               seed: int) -> list[GenerationJob]:
    """One job per planned image: each group's share split over its adapters (by their training images), its seed,
    condition and, for edits, a real source image of its class drawn by seed."""
    jobs = []
    order = sorted(plan)
    for gi, key in enumerate(order):
        n = plan[key]
        if not n:
            continue
        group_adapters = by_group.get(key, [])
        sizes = np.array([a["num_images"] for a in group_adapters], dtype=float)
        shares = _split(n, sizes) if len(group_adapters) else [n]
        vals = group_values[key]
        cond = model_condition(base.diff, vals) if base.kind == "conditional" else None
        for ai, share in enumerate(shares):
            a = group_adapters[ai] if group_adapters else None
            ci = a["cluster"] if a else 0
            use_cond = cond if (a is None or a.get("condition") is not None) else None
            cands = class_sources.get(cond[0], []) if source == "edit" and cond else []
            if source == "edit" and share and not cands:
                raise validation.FairBalanceError(f"source='edit': no real image of the class of group '{key}'")
            for i in range(share):
                img_seed = seed * 1_000_003 + gi * 100_003 + ci * 1_009 + i
                src = cands[np.random.default_rng([seed, gi, ci, i]).integers(len(cands))] if cands else None
                prov = {"group": key, "adapter": a["name"] if a else None, "token": a.get("token") if a else None,
                        "cluster": ci, "seed": img_seed, "prompt": a.get("prompt") if a else None}
                if src:
                    prov["source_filepath"] = src[0]
                jobs.append(GenerationJob(f"g{gi:03d}c{ci}_seed{seed}_{i:05d}.png", key, dict(vals), prov,
                                          _Input(prov["adapter"], use_cond, img_seed, prov["prompt"],
                                                 src[0] if src else None, src[1] if src else None)))
    return jobs


def validate_inputs(samples, target_dataset=None, **kwargs) -> None:
    """The up-front checks of a sharded :func:`generate_per_group` (run by ``queue_sharded`` before queuing)."""
    import inspect

    require_own_target(samples, target_dataset)
    names = set(inspect.signature(_plan_per_group).parameters) - {"samples"}
    loaded = _plan_per_group(samples, **{**{k: v for k, v in kwargs.items() if k in names}, "device": "cpu"})[0]
    activate(loaded.base.unet, None)


def _split(n: int, sizes: np.ndarray) -> list[int]:
    """``n`` images over clusters in proportion to their sizes (largest remainders), deterministic."""
    raw = n * sizes / sizes.sum()
    out = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - out), kind="stable")[: n - out.sum()]:
        out[j] += 1
    return out.tolist()


def _runs_by_adapter(batch):
    """Consecutive jobs of the same adapter (the loop's batches follow the plan's order)."""
    out, start = [], 0
    for j in range(1, len(batch) + 1):
        if j == len(batch) or batch[j].payload.adapter != batch[start].payload.adapter:
            out.append(batch[start:j])
            start = j
    return out


def _conditional_renderer(loaded: GroupAdapters, provenance: dict):
    from fairbalance.generate.diffusion_sampling import sample_images

    diff = loaded.base.diff
    size = diff.unet.config.sample_size

    def render(batch):
        images = []
        for part in _runs_by_adapter(batch):
            loaded.use(part[0].payload.adapter)
            inputs = [j.payload for j in part]
            null = tuple(diff.model.condition.factor_sizes)
            conds = [d.condition if d.condition is not None else null for d in inputs]
            init = ref = None
            if inputs[0].source is not None:
                init = load_images([d.source for d in inputs], [size, size], scale="symmetric",
                                            progress=False)
                if provenance["guidance_reference"] == "source":
                    ref = [d.source_condition for d in inputs]
            images.extend(sample_images(diff, conds, [d.seed for d in inputs], provenance["guidance_scale"],
                                        provenance["num_inference_steps"], provenance["scheduler"],
                                        provenance["attribute_guidance_scale"], init,
                                        provenance["edit_strength"] if init is not None else None, ref))
        return images

    return render


def _sd_renderer(loaded: GroupAdapters, provenance: dict):
    pipe = loaded.base.pipe
    pipe.set_progress_bar_config(disable=True)
    from diffusers import DDIMScheduler, DDPMScheduler

    pipe.scheduler = (DDIMScheduler if provenance["scheduler"] == "ddim" else DDPMScheduler).from_config(
        pipe.scheduler.config)

    def render(batch):
        images = []
        for part in _runs_by_adapter(batch):
            loaded.use(part[0].payload.adapter)
            gens = [torch.Generator(device="cpu").manual_seed(j.payload.seed) for j in part]
            out = pipe([j.payload.prompt for j in part], guidance_scale=provenance["guidance_scale"],
                       num_inference_steps=provenance["num_inference_steps"], generator=gens,
                       height=provenance["height"], width=provenance["width"], output_type="pil")
            images.extend(out.images)
        return images

    return render
