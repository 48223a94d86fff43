"""The shared generation loop: jobs, provenance, the output-folder claim, sharded plans and their merge.

Every generator (balanced clusters/cells, DiffInject, per-group LoRA, text-to-image) plans its
``GenerationJob`` list and hands it to ``run_generation`` (directly or through ``generate_plan`` and
``shard_generation``): batch -> images (temp file + rename) -> samples with provenance -> run record.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from fairbalance.core import folders, runs, sharding, validation, writeback
from fairbalance.core.jobs import job_id as shard_job_id

GENERATION_FILE = "fairbalance_generation.json"
_HEX = "[0-9a-f]"
# The file names every generator writes (balanced clusters/cells, DiffInject, per-group LoRA, text-to-image):
# what a folder without its manifest is checked for, and what overwrite deletes (never other files there).
GENERATED_FILE_PATTERNS = ("cluster*_seed*_*.png", "cell*x*_seed*_*.png", "inject_seed*_*.png",
                           "g[0-9][0-9][0-9]c*_seed*_*.png", f"{_HEX * 24}_{_HEX * 12}.png")


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


def finish_generation(run: runs.PreparedRun, result: Any, **extra) -> Any:
    """Record the generation run (after every image and sample is in place); ``extra``: more results to store.
    ``result``: a ``GenerationResult`` (or a subclass); returned as given."""
    run.write(lambda: None)
    run.save_results({**result.to_dict(), **extra})
    return result


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


def _label_writers(target, names) -> dict[str, Callable]:
    """How each label field of a generated sample is written: a Classification, or the plain value when
    ``target`` holds the field as a plain str/int/bool (the ``slice`` field of ``discover_slices``, say)."""
    import fiftyone as fo

    schema = target.get_field_schema()
    plain = ((fo.BooleanField, lambda v: str(v) == "True"), (fo.IntField, int), (fo.StringField, str))
    return {f: next((conv for kind, conv in plain if isinstance(schema.get(f), kind)),
                    lambda v: fo.Classification(label=str(v))) for f in names}


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
    writers: dict[str, Callable] | None = None  # field -> how its value is written, once the schema is declared
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
            if writers is None:  # the schema before the first sample (after the first images: a failed render adds none)
                _declare_fields(target, jobs, provenance)
                writers = _label_writers(target, {f for j in jobs for f in j.fields})
            paths = [j.filepath for j in batch]
            present = set(target.match(Fv("filepath").is_in(paths)).values("filepath"))
            new = [fo.Sample(filepath=j.filepath, tags=list(tags), generated=True,
                             generation=provenance_value(target, {**provenance, **j.provenance}),
                             **{f: writers[f](v) for f, v in j.fields.items()})
                   for j in batch if j.filepath not in present]
            for j in batch:
                if j.filepath not in present:
                    added[j.key] = added.get(j.key, 0) + 1
            if new:
                target.add_samples(new, progress=False)
            pb.update(len(batch))
    return added


def _claim_output_dir(folder: str, target, setting: dict, overwrite: bool) -> None:
    """Make ``folder`` hold images of ``setting`` only (:func:`folders.claim_setting`, its manifest
    ``GENERATION_FILE``): another setting's images are refused unless ``overwrite``.

    Reruns reuse existing files by name, so a folder written by another model
    (or the same folder after more training) must not be mixed in silently.
    Shards of one job pass: the first writes the manifest, the others find the same setting.
    """
    import glob

    manifest = os.path.join(folder, GENERATION_FILE)
    previous = None
    if os.path.isfile(manifest):
        with open(manifest) as f:
            previous = json.load(f)
    if previous == setting:
        return
    images_there = sorted({p for pattern in GENERATED_FILE_PATTERNS for p in glob.glob(os.path.join(folder, pattern))})
    mine = images_there
    if os.path.isfile(os.path.join(folder, folders.LIST_FILE)):  # only the images this run listed there (a
        listed = {os.path.join(folder, n) for n in folders.listed(folder)}  # folder from before lists: all its own)
        mine = [p for p in images_there if p in listed]

    def forget():  # their samples first, then the images (the listed ones would go with the list anyway)
        from fiftyone import ViewField as Fv

        target.delete_samples(target.match(Fv("filepath").is_in(mine)))  # a real query, not len()
        for p in mine:
            os.remove(p)

    folders.claim_setting(folder, previous, setting, overwrite, unknown=len(images_there), kind="images",
                          forget=forget)
    tmp = f"{manifest}.{uuid.uuid4().hex}.tmp"  # shards starting at once each write their own, then rename
    with open(tmp, "w") as f:
        json.dump(setting, f, indent=1)
    os.replace(tmp, manifest)
