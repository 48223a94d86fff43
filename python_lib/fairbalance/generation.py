"""Generated samples that join the dataset: what to generate, the shared loop, provenance.

``generate_balanced`` plans the images (the same number per cluster, fill up
to the largest cluster, or every class x attribute cell up to a count), then
runs one loop: batch -> images (temp file + rename) -> samples with
provenance -> run record. Every image has its own seed and file name, so
reruns are idempotent and an interrupted run resumes where it stopped; an
output folder holding another model's or setting's images is refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from fairbalance import runs, training, validation, writeback
from fairbalance.balance import label_path
from fairbalance.diffusion import ConditionalDiffusionModel, load_conditional_diffusion, sample_images, validate_sampling

GENERATION_FILE = "fairbalance_generation.json"


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
class _Job:
    """One image to generate: its condition, seed, file, sample fields, and source image for an edit."""

    condition: tuple[int, ...]
    seed: int
    filepath: str
    key: str
    fields: dict
    source: tuple[str, str] | None = None  # (sample id, filepath)
    source_condition: tuple[int, ...] | None = None


def _cell_jobs(samples, diff: ConditionalDiffusionModel, per_cell: int, source: str, seed: int, output_dir: str):
    """Jobs that fill every class x attribute cell of the view's real samples up to ``per_cell``."""
    real = training.labelled_samples(samples, diff.label_field, diff.classes).real(required=False)
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
            jobs.append(_Job((ci, ai), img_seed, os.path.join(output_dir, f"cell{ci}x{ai}_seed{seed}_{i:05d}.png"),
                             f"{c}|{a}", {diff.label_field: c, diff.attribute_field: a}, src, src_cond))
    return jobs, {f"{diff.classes[ci]}|{diff.attributes[ai]}": n for (ci, ai), n in plan.items()}


def _cluster_jobs(samples, diff: ConditionalDiffusionModel, mode, total, per_class, seed, output_dir):
    """Jobs that balance the clusters of a single-condition model (``equal`` or ``fill``)."""
    from fiftyone import ViewField as Fv

    path = label_path(samples, diff.label_field)
    real = samples.match(Fv("generated") != True) if samples._root_dataset.has_field("generated") else samples  # noqa
    present = real.count_values(path)
    plan = plan_counts({c: present.get(c, 0) for c in diff.classes}, mode, total, per_class)
    jobs = [_Job((ci,), seed * 1_000_003 + ci * 100_003 + i,
                 os.path.join(output_dir, f"cluster{c}_seed{seed}_{i:05d}.png"), c, {diff.label_field: c})
            for ci, c in enumerate(diff.classes) for i in range(plan[c])]
    return jobs, plan


def generate_balanced(
    samples,
    label_field: str = "sa_cluster",
    model: str | None = None,
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
    output_dir: str | None = None,
    target_dataset=None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    run_key: str = "generate_balanced",
    overwrite: bool = False,
    progress=None,
) -> dict:
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

    New samples get ``generated=True``, the condition's label field(s) (the
    class label for cells, so classifiers can train on them),
    ``generation`` (model, sampler, seed, cell, source sample) and the tag
    ``generated``. Image ``i`` of a cell always has the same seed, so a
    rerun adds nothing twice and an interrupted run continues where it
    stopped. An ``output_dir`` that holds images of another model or
    setting is refused; ``overwrite=True`` deletes those images and their
    samples first. Returns the counts added and planned.
    """
    validation.require_nonempty(samples)
    if model is None:
        raise validation.FairBalanceError("model: pass the folder returned by train_conditional_diffusion")
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
    target, output_dir = writeback.generation_target(samples, target_dataset, output_dir, run_key)
    if mode == "cells":
        jobs, plan = _cell_jobs(samples, diff, per_cell, source, seed, output_dir)
    else:
        jobs, plan = _cluster_jobs(samples, diff, mode, total, per_class, seed, output_dir)
    setting = {"model": diff.folder, "model_step": diff.step, "label_field": label_field,
               "attribute_field": diff.attribute_field, "guidance_scale": guidance_scale,
               "attribute_guidance_scale": attribute_guidance_scale, "guidance_reference": guidance_reference,
               "num_inference_steps": num_inference_steps,
               "scheduler": scheduler, "source": source, "edit_strength": edit_strength if source == "edit" else None}
    _claim_output_dir(output_dir, target, setting, overwrite)
    provenance = {**setting, "mode": mode, "run_key": run_key}
    existing = set(target.values("filepath")) if len(target) else set()
    jobs = [j for j in jobs if j.filepath not in existing]
    added = _run_jobs(diff, jobs, target, provenance, batch_size, progress)
    result = {"added": {k: added.get(k, 0) for k in plan}, "planned": plan, "output_dir": output_dir,
              "target_dataset": target.name, "run_key": run_key}
    run = runs.prepare(target, run_key, "generate_balanced", {
        **provenance, "total": total, "per_class": per_class, "per_cell": per_cell, "seed": seed}, [], overwrite=True)
    run.write(lambda: None)
    run.save_results(result)
    return result


def _run_jobs(diff: ConditionalDiffusionModel, jobs: list[_Job], target, provenance: dict, batch_size: int,
              progress) -> dict[str, int]:
    """Generate batch by batch: image files (temp + rename), then their samples, in bulk per batch."""
    import fiftyone as fo
    import fiftyone.core.utils as fou
    from PIL import Image

    added: dict[str, int] = {}
    size = diff.unet.config.sample_size
    with fou.ProgressBar(total=len(jobs), progress=progress) as pb:
        for b in range(0, len(jobs), batch_size):
            batch = jobs[b: b + batch_size]
            todo = [j for j in batch if not os.path.isfile(j.filepath)]
            if todo:
                init = None
                if todo[0].source is not None:
                    init = training.load_images([j.source[1] for j in todo], [size, size], scale="symmetric")
                reference = [j.source_condition for j in todo] if provenance["guidance_reference"] == "source" else None
                imgs = sample_images(diff, [j.condition for j in todo], [j.seed for j in todo],
                                     provenance["guidance_scale"], provenance["num_inference_steps"],
                                     provenance["scheduler"], provenance["attribute_guidance_scale"], init,
                                     provenance["edit_strength"] if init is not None else None, reference)
                for job, img in zip(todo, imgs):
                    tmp = job.filepath + ".tmp.png"
                    Image.fromarray(img).save(tmp)
                    os.replace(tmp, job.filepath)
            new = []
            for job in batch:
                extra = {"source_id": job.source[0], "source_filepath": job.source[1]} if job.source else {}
                new.append(fo.Sample(filepath=job.filepath, tags=["generated"], generated=True,
                                     generation={**provenance, "seed": job.seed, "cell": job.key, **extra},
                                     **{f: fo.Classification(label=v) for f, v in job.fields.items()}))
                added[job.key] = added.get(job.key, 0) + 1
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
    images_there = [p for pattern in ("cluster*_seed*.png", "cell*x*_seed*.png")
                    for p in glob.glob(os.path.join(folder, pattern))]
    if previous == setting:
        return
    if previous is not None or images_there:
        if not overwrite:
            what = f"images of {previous}" if previous else f"{len(images_there)} images of an unknown run"
            raise validation.FairBalanceError(
                f"{folder} already holds {what}; pass overwrite=True to replace them or choose another output_dir")
        if len(target):
            from fiftyone import ViewField as Fv

            target.delete_samples(target.match(Fv("filepath").is_in(images_there)))
        for p in images_there:
            os.remove(p)
    tmp = manifest + ".tmp"
    with open(tmp, "w") as f:
        json.dump(setting, f, indent=1)
    os.replace(tmp, manifest)
