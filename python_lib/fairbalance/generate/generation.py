"""Generated samples that join the dataset: what to generate, the shared loop, provenance.

``generate_balanced`` plans the images (the same number per cluster, fill up
to the largest cluster, or every class x attribute cell up to a count), then
runs one loop: batch -> images (temp file + rename) -> samples with
provenance -> run record. Every image has its own seed and file name, so
reruns are idempotent and an interrupted run resumes where it stopped; an
output folder holding another model's or setting's images is refused.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from fairbalance.core import folders, runs, sharding, validation, writeback
from fairbalance.core.jobs import job_id as shard_job_id
from fairbalance.find import balance
from fairbalance.core.fields import label_path
from fairbalance.core.data import labelled_samples, load_images
from fairbalance.generate.diffusion_model import ConditionalDiffusionModel, load_conditional_diffusion
from fairbalance.generate.diffusion_sampling import sample_images, validate_sampling

GENERATION_FILE = "fairbalance_generation.json"
_HEX = "[0-9a-f]"
# The file names every generator writes (balanced clusters/cells, DiffInject, per-group LoRA, text-to-image):
# what a folder without its manifest is checked for, and what overwrite deletes (never other files there).
GENERATED_FILE_PATTERNS = ("cluster*_seed*_*.png", "cell*x*_seed*_*.png", "inject_seed*_*.png",
                           "g[0-9][0-9][0-9]c*_seed*_*.png", f"{_HEX * 24}_{_HEX * 12}.png")


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
class GenerationJob:
    """One image to generate: its file, the group it counts toward, its label fields and provenance.

    ``payload`` is the generator's own input (a condition and seed, a prompt,
    an (original, content) pair); the shared loop never looks inside it.
    """

    filepath: str
    key: str
    fields: dict
    provenance: dict
    payload: Any = None


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


def start_generation(samples, target_dataset, output_dir: str | None, run_key: str, method: str, config: dict,
                     setting: dict, overwrite: bool):
    """Everything a generator checks and claims before its first image: ``(target, folder, run)``.

    The target dataset and image folder are resolved and the folder claimed;
    the run key may be new, the same run rerun with the same config (it
    resumes: images already there are not made or added again), or
    replaced with ``overwrite=True``, which first deletes that run's
    samples and images; a folder holding another setting's images is
    refused unless ``overwrite``.
    """
    from fiftyone import ViewField as Fv

    target, output_dir = writeback.generation_target(samples, target_dataset, output_dir, run_key)
    run = runs.prepare(target, run_key, method, {**config, "output_dir": output_dir}, [], overwrite,
                       rerun_same_config=True)
    if overwrite and target.has_run(run_key) and target.has_field("generation"):
        old = target.match(Fv("generation.run_key") == run_key)
        for path in old.values("filepath"):
            if os.path.isfile(path):
                os.remove(path)
        target.delete_samples(old)
    _claim_output_dir(output_dir, target, setting, overwrite)
    return target, output_dir, run


def finish_generation(run: runs.PreparedRun, result: GenerationResult, **extra) -> GenerationResult:
    """Record the generation run (after every image and sample is in place); ``extra``: more results to store."""
    run.write(lambda: None)
    run.save_results({**result.to_dict(), **extra})
    return result


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
        batch_size, device, run_key, inversion, keep_background)
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
                   inversion=False, keep_background=False):
    """Every check of :func:`generate_balanced` and its plan (file names relative), before anything is claimed.

    Returns ``(model, jobs, planned, counts_before, setting, provenance, run config)``.
    """
    validation.require_nonempty(samples)
    validation.require_seed(seed)
    validation.require_device(device)
    for name, value in (("total", total), ("per_class", per_class), ("per_cell", per_cell)):
        if value is not None:
            validation.require_positive_int(name, value)
    model = os.fspath(runs.given_or_recorded(samples, model, model_run, "conditional_diffusion", "model_dir",
                                             "model (a model folder)", "model_run"))
    if source not in ("noise", "edit"):
        raise validation.FairBalanceError(f"source must be 'noise' or 'edit', not {source!r}")
    validate_sampling(guidance_scale, num_inference_steps, scheduler, attribute_guidance_scale,
                      edit_strength if source == "edit" else None)
    validation.require_positive_int("batch_size", batch_size)
    diff = load_conditional_diffusion(model, device)
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
        if not isinstance(value, bool):
            raise validation.FairBalanceError(f"{name} must be True or False, not {value!r}")
        if value and source != "edit":
            raise validation.FairBalanceError(f"{name}=True edits a source image: it needs source='edit'")
    setting = {"model": diff.folder, "model_step": diff.step, "label_field": label_field,
               "attribute_field": diff.attribute_field, "guidance_scale": guidance_scale,
               "attribute_guidance_scale": attribute_guidance_scale, "guidance_reference": guidance_reference,
               "num_inference_steps": num_inference_steps,
               "scheduler": scheduler, "source": source, "edit_strength": edit_strength if source == "edit" else None,
               # recorded only when on, so folders and runs made before these options still resume
               **({"inversion": True} if inversion else {}), **({"keep_background": True} if keep_background else {})}
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


# ----------------------------------------------------------------------------- sharded generation


def real_samples(samples):
    """The view's own samples, not generated ones: what a generation job is planned from and keyed on."""
    from fiftyone import ViewField as Fv

    # always the match, never the schema: another process may add the first generated samples (and the field)
    # after this one loaded the dataset
    return samples.match(Fv("generated") != True)  # noqa: E712


def require_own_target(samples, target_dataset) -> None:
    name = target_dataset if isinstance(target_dataset, str) or target_dataset is None else getattr(
        target_dataset, "name", None)
    if name is not None and name != samples._root_dataset.name:
        raise validation.FairBalanceError(
            f"A sharded generation adds its samples to the samples' own dataset ('{samples._root_dataset.name}'), "
            f"where its job and run record live; target_dataset={name!r} works without shards only")


def check_shard_args(samples, target_dataset, shard, num_shards, overwrite) -> bool:
    """Whether this call makes one shard; a shard's arguments checked (no overwrite, the own dataset)."""
    if shard is None and num_shards is None:
        return False
    sharding.validate_shard(shard, num_shards)
    if overwrite:
        raise validation.FairBalanceError(
            "a shard cannot overwrite its run (other shards write it too): delete the run first or "
            "queue_sharded(..., overwrite=True)")
    require_own_target(samples, target_dataset)
    return True


def _plan_digest(jobs: Sequence[GenerationJob]) -> str:
    """A digest of a plan (file names, groups, seeds and sources): every shard must plan the same images."""
    return hashlib.sha1("\n".join(
        f"{j.filepath}\t{j.key}\t{json.dumps(runs.jsonable(j.provenance), sort_keys=True)}"
        for j in jobs).encode()).hexdigest()


def _count(jobs: Sequence[GenerationJob], paths: set) -> dict[str, int]:
    out: dict[str, int] = {}
    for j in jobs:
        if j.filepath in paths:
            out[j.key] = out.get(j.key, 0) + 1
    return out


def _declare_fields(target, jobs: Sequence[GenerationJob], provenance: dict | None = None) -> None:
    """The fields generated samples get, declared before the first one is added.

    Shards add samples at once from several processes; declaring the
    schema first leaves no concurrent schema expansion to race.
    """
    import fiftyone as fo

    target.reload()
    if not target.has_sample_field("generated"):
        target.add_sample_field("generated", fo.BooleanField)
    if not target.has_sample_field("generation"):
        target.add_sample_field("generation", fo.EmbeddedDocumentField, embedded_doc_type=fo.DynamicEmbeddedDocument)
    if provenance is not None:
        merged = dict(provenance)
        for j in jobs:  # every key any job carries (an edit's source_id, say), with a value to type it by
            merged.update({k: v for k, v in j.provenance.items() if merged.get(k) is None})
        _declare_provenance(target, merged)
    for f in sorted({f for j in jobs for f in j.fields}):
        if not target.has_sample_field(f):
            target.add_sample_field(f, fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)


#: The subfields every generated sample's ``generation`` document may carry, each shown and filterable in
#: the App's sidebar: the run, the cell or group it balances, the real image it edits, the seed, the model
#: and its training step. Generators add their own settings (``guidance_scale``, ``prompt``, ...) beside them.
PROVENANCE_FIELDS = ("run_key", "cell", "group", "source_id", "source_filepath", "seed", "model", "model_step")


def _generation_is_document(target) -> bool:
    import fiftyone as fo

    field = target.get_field("generation") if target.has_sample_field("generation") else None
    return isinstance(field, fo.EmbeddedDocumentField)


def _declare_provenance(target, prov: dict) -> None:
    """Declare ``generation``'s subfields for ``prov``'s keys (an embedded document only), before samples are added.

    Declared up front so shards adding samples at once race on no schema
    expansion, and so the App lists each subfield in its sidebar. A
    ``generation`` that is a ``DictField`` (datasets made before provenance
    was a document) is left as it is.
    """
    if not _generation_is_document(target):
        return
    schema = target.get_field("generation").get_field_schema()
    for key, value in prov.items():
        if key in schema or value is None or key.startswith("_") or not key.isidentifier():
            continue
        if isinstance(value, dict):  # nested settings: one subfield holding the dict, not a sub-document
            import fiftyone as fo

            target.add_sample_field(f"generation.{key}", fo.DictField)
            continue
        kwargs = _implied_kwargs(value)
        if kwargs is not None:
            target.add_sample_field(f"generation.{key}", **kwargs)


def _implied_kwargs(value):
    import fiftyone.core.odm as foo

    try:
        return foo.get_implied_field_kwargs(value)
    except (TypeError, ValueError):
        return None


def provenance_value(target, prov: dict):
    """The ``generation`` value of a new sample of ``target``: an embedded document, or a dict where the dataset's
    ``generation`` is still a ``DictField``. Either reads the same through ``values("generation.<key>")``.

    A value whose type differs from the declared subfield (an ``int`` where
    a float was declared, say) is converted when that loses nothing;
    a string subfield gets other values as text.
    """
    import fiftyone as fo

    if not _generation_is_document(target):
        return dict(prov)
    schema = target.get_field("generation").get_field_schema()
    out = {}
    for key, value in prov.items():
        field = schema.get(key)
        if value is None or field is None:
            out[key] = value
        elif isinstance(field, fo.FloatField) and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
        elif isinstance(field, fo.IntField) and isinstance(value, float) and value.is_integer():
            out[key] = int(value)
        else:
            out[key] = str(value) if isinstance(field, fo.StringField) and not isinstance(value, str) else value
    return fo.DynamicEmbeddedDocument(**out)


def generate_plan(samples, function: str, method: str, run_key: str, jobs: list[GenerationJob], config: dict,
                  setting: dict, render: Callable[[list], list], provenance: dict, batch_size: int,
                  result_class: type, result_fields: dict, target_dataset=None, output_dir: str | None = None,
                  overwrite: bool = False, sharded: bool = False, shard: int | None = None,
                  num_shards: int | None = None, chunk_size: int = sharding.DEFAULT_CHUNK_SIZE, progress=None):
    """What every generator does with its plan: one shard of it (:func:`shard_generation`), or all of it here.

    Unsharded: the target, folder and run are checked and claimed
    (:func:`start_generation`), images whose samples exist are skipped, the
    rest go through :func:`run_generation`, and the run is recorded.
    ``result_fields``: ``planned``, ``counts_before`` and ``result_class``'s
    own fields.
    """
    if sharded:
        return shard_generation(samples, function, run_key, shard, num_shards, chunk_size, jobs, config, setting,
                                output_dir, render, provenance, batch_size, result_class, result_fields, progress)
    target, output_dir, run = start_generation(samples, target_dataset, output_dir, run_key, method, config, setting,
                                               overwrite)
    for job in jobs:
        job.filepath = os.path.join(output_dir, job.filepath)
    existing = set(target.values("filepath"))  # a real query: len(target) is an estimate, 0 after a crash
    todo = [j for j in jobs if j.filepath not in existing]
    added = run_generation(todo, target, render, provenance, batch_size, progress)
    # resumed when an earlier call made some of the plan (a kill leaves no record, so the record alone cannot say)
    resumed = run.resumed or len(todo) < len(jobs)
    planned = result_fields["planned"]
    extra = {k: v for k, v in result_fields.items() if k not in ("planned", "counts_before")}
    result = result_class(run_key, {k: added.get(k, 0) for k in planned}, planned, output_dir, target.name, resumed,
                          result_fields.get("counts_before"), **extra)
    if not todo and run.resumed:  # a finished run rerun: nothing done, so its record is not rewritten
        return result
    # the record describes the run: every sample of its plan, those of an earlier, interrupted call too
    total = _count(jobs, existing | {j.filepath for j in todo})
    return finish_generation(run, result, added={k: total.get(k, 0) for k in planned}, num_added=sum(total.values()),
                             num_added_now=result.num_added)


def shard_generation(samples, function: str, run_key: str, shard: int, num_shards: int, chunk_size: int,
                     jobs: list[GenerationJob], config: dict, setting: dict, output_dir: str | None,
                     render: Callable[[list], list], provenance: dict, batch_size: int, result_class: type,
                     result_fields: dict, progress=None) -> sharding.ShardResult:
    """One shard of a sharded generation: its part of the plan (job ``i`` to shard ``i % n``), chunk by chunk.

    ``jobs`` (file names relative to the output folder) is the whole plan,
    the same in every shard. The folder is shared by the job's shards (the
    first writes its manifest; the same setting passes); images and samples
    already there are skipped (resume). Each shard records what it added;
    :func:`merge_shards` makes the run record that one unsharded run makes.
    ``result_fields``: ``planned``, ``counts_before`` and ``result_class``'s
    own fields, the same in every shard.
    """
    import fiftyone.core.utils as fou

    dataset = samples._root_dataset
    digest = _plan_digest(jobs)
    target, output_dir = writeback.generation_target(samples, None, output_dir, run_key,
                                                     shared_by=f"{shard_job_id(dataset, run_key)}|{shard}")
    _claim_output_dir(output_dir, target, setting, False)
    for job in jobs:
        job.filepath = os.path.join(output_dir, job.filepath)
    mine = sharding.split(jobs, shard, num_shards)
    by_path = {j.filepath: j for j in mine}
    existing = set(target.values("filepath"))  # a real query: len(target) is an estimate, 0 after a crash
    present = {p for p in by_path if p in existing}
    run = sharding.Shard(samples, run_key, function, shard, num_shards, {**config, "output_dir": output_dir}, [],
                         chunk_size=chunk_size, items=list(by_path), done=present, num_items=len(jobs))
    extra = {k: v for k, v in result_fields.items() if k not in ("planned", "counts_before")}
    before = result_fields.get("counts_before")
    plan = run.shared("plan", lambda: {  # group -> count as pairs: group names may hold any character
        "sha1": digest, "result_class": result_class.__qualname__,
        "output_dir": output_dir, "target_dataset": target.name, "planned": list(result_fields["planned"].items()),
        "counts_before": None if before is None else list(before.items()), "extra": extra})
    if plan["sha1"] != digest:
        raise validation.FairBalanceError(
            f"Shard {shard} of run '{run_key}' planned other images than the shard that started the run (the "
            "view's samples or labels changed since?); delete the run, or queue_sharded(..., overwrite=True)")
    # what this shard's part held before its first attempt: a rerun counts only what the job added
    pre = dict(run.shared(f"present_before_{shard}", lambda: list(_count(mine, present).items())))
    _declare_fields(target, mine, provenance)
    with fou.ProgressBar(total=max(run.total, 1), progress=progress) as pb:
        pb.update(run.resumed)
        for chunk in run.chunks():
            run_generation([by_path[p] for p in chunk], target, render, provenance, batch_size, progress=False)
            run.chunk_done(chunk)
            pb.update(len(chunk))
    now = _count(mine, set(target.values("filepath")))
    return run.finish({"added": [[k, n - pre.get(k, 0)] for k, n in now.items()]})


# the result classes a sharded generation's job document may name (merge_shards imports nothing else): the name
# recorded (the class name; jobs queued before the subpackages recorded "fairbalance.<module>:<class>") -> its path
RESULT_CLASSES = {
    "GenerationResult": "fairbalance.generate.generation:GenerationResult",
    "InjectionResult": "fairbalance.generate.diffinject:InjectionResult",
    "fairbalance.generation:GenerationResult": "fairbalance.generate.generation:GenerationResult",
    "fairbalance.diffinject:InjectionResult": "fairbalance.generate.diffinject:InjectionResult",
}


def merge_shards(samples, job: dict) -> dict:
    """The results of a sharded generation whose shards are all done: those of one unsharded run."""
    plan = job["shared"]["plan"]
    added: dict[str, int] = {}
    for s in job["shards"].values():
        for k, n in (s.get("summary") or {}).get("added", []):
            added[k] = added.get(k, 0) + n
    planned = dict(plan["planned"])
    if plan["result_class"] not in RESULT_CLASSES:  # a name read from MongoDB: never import what it says
        raise validation.FairBalanceError(
            f"The job of run '{job['run_key']}' names an unknown result class {plan['result_class']!r}; "
            f"known: {', '.join(RESULT_CLASSES)}; queue the job again with overwrite=True")
    module, name = RESULT_CLASSES[plan["result_class"]].split(":")
    cls = getattr(importlib.import_module(module), name)
    before = None if plan["counts_before"] is None else dict(plan["counts_before"])
    result = cls(job["run_key"], {k: added.get(k, 0) for k in planned}, planned, plan["output_dir"],
                 plan["target_dataset"], False, before, **plan["extra"])
    return {**result.to_dict(), "num_added_now": result.num_added}  # as the record of one unsharded run


def delete_generated(samples, run_key: str) -> None:
    """Delete a generation run's samples and images (``queue_sharded(..., overwrite=True)``).

    Its folder's manifest goes too when no generated image is left there,
    so the new run may use the folder with another setting.
    """
    import glob

    from fiftyone import ViewField as Fv

    dataset = samples._root_dataset
    job = sharding.get_job(dataset, run_key)
    cfg = (job or {}).get("config") or (runs.get_run_config(dataset, run_key) if dataset.has_run(run_key) else {})
    folders = {cfg["output_dir"]} if cfg.get("output_dir") else set()
    if dataset.has_field("generation"):
        old = dataset.match(Fv("generation.run_key") == run_key)
        for path in old.values("filepath"):
            folders.add(os.path.dirname(path))
            if os.path.isfile(path):
                os.remove(path)
        dataset.delete_samples(old)
    for folder in folders:
        manifest = os.path.join(folder, GENERATION_FILE)
        if os.path.isfile(manifest) and not any(glob.glob(os.path.join(folder, p)) for p in GENERATED_FILE_PATTERNS):
            os.remove(manifest)


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
                             inversion_labels=[d.source_condition for d in inputs] if init is not None else None)

    return render


def run_generation(jobs: Sequence[GenerationJob], target, render: Callable[[list], list], provenance: dict,
                   batch_size: int, progress=None, tags: Sequence[str] = ("generated",)) -> dict[str, int]:
    """The one generation loop: batch -> images (temp file + rename) -> samples with provenance, in bulk.

    ``render(jobs)`` returns one image per job (uint8 H x W x 3 array or PIL
    image). Jobs whose file exists are not rendered again, and jobs whose
    file is already a sample of ``target`` are not added again, so a rerun
    (or a resumed, interrupted run) adds each image exactly once. Every
    sample gets ``generated=True``, ``generation`` (``provenance`` + the
    job's own) and ``tags``. Returns the samples added per job key.
    """
    import fiftyone as fo
    import fiftyone.core.utils as fou
    from fiftyone import ViewField as Fv
    from PIL import Image

    added: dict[str, int] = {}
    declared = False
    with fou.ProgressBar(total=len(jobs), progress=progress) as pb:
        for b in range(0, len(jobs), batch_size):
            batch = list(jobs[b: b + batch_size])
            todo = [j for j in batch if not os.path.isfile(j.filepath)]
            for folder in {os.path.dirname(j.filepath) for j in todo}:  # listed before written: overwrite finds them
                folders.record(folder, [os.path.basename(j.filepath) + ext for j in todo for ext in ("", ".tmp.png")
                                        if os.path.dirname(j.filepath) == folder])
            if todo:
                for job, img in zip(todo, render(todo)):
                    img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))
                    tmp = job.filepath + ".tmp.png"
                    try:
                        img.convert("RGB").save(tmp)
                        os.replace(tmp, job.filepath)
                    except BaseException:  # a full disk, a kill signal: no half-written temporary file left
                        if os.path.exists(tmp):
                            os.remove(tmp)
                        raise
            if not declared:  # the schema before the first sample (after the first images: a failed render adds none)
                _declare_fields(target, jobs, provenance)
                declared = True
            paths = [j.filepath for j in batch]
            present = set(target.match(Fv("filepath").is_in(paths)).values("filepath"))
            new = [fo.Sample(filepath=j.filepath, tags=list(tags), generated=True,
                             generation=provenance_value(target, {**provenance, **j.provenance}),
                             **{f: fo.Classification(label=str(v)) for f, v in j.fields.items()})
                   for j in batch if j.filepath not in present]
            for j in batch:
                if j.filepath not in present:
                    added[j.key] = added.get(j.key, 0) + 1
            if new:
                target.add_samples(new, progress=False)
            pb.update(len(batch))
    return added


def _claim_output_dir(folder: str, target, setting: dict, overwrite: bool) -> None:
    """Make ``folder`` hold images of ``setting`` only: refuse another setting's images unless ``overwrite``.

    Reruns reuse existing files by name, so a folder written by another model
    (or the same folder after more training) must not be mixed in silently.
    """
    import glob

    manifest = os.path.join(folder, GENERATION_FILE)
    previous = None
    if os.path.isfile(manifest):
        with open(manifest) as f:
            previous = json.load(f)
    images_there = sorted({p for pattern in GENERATED_FILE_PATTERNS for p in glob.glob(os.path.join(folder, pattern))})
    if previous == setting:
        return
    if previous is not None or images_there:
        if not overwrite:
            what = f"images of {previous}" if previous else f"{len(images_there)} images of an unknown run"
            raise validation.FairBalanceError(
                f"{folder} already holds {what}; pass overwrite=True to replace them or choose another output_dir")
        if os.path.isfile(os.path.join(folder, folders.LIST_FILE)):  # only the images this run listed there (a
            mine = {os.path.join(folder, n) for n in folders.listed(folder)}  # folder from before lists: all its own)
            images_there = [p for p in images_there if p in mine]
        from fiftyone import ViewField as Fv

        target.delete_samples(target.match(Fv("filepath").is_in(images_there)))  # a real query, not len()
        for p in images_there:
            os.remove(p)
    tmp = f"{manifest}.{uuid.uuid4().hex}.tmp"  # shards starting at once each write their own, then rename
    with open(tmp, "w") as f:
        json.dump(setting, f, indent=1)
    os.replace(tmp, manifest)
