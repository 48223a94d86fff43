"""Pipeline files: data -> audit -> tag -> generate -> train -> verify -> export from one YAML file, resumable.

A pipeline file names a dataset, optionally a default view (a saved view or a
tag) and a ``name``, and steps, each a capability (the command-line name)
with the SDK's parameters, or a data step (``colored-digits``,
``colored-mnist``: they create the dataset), ``check`` (the balance gate) or
``export``::

    name: repair
    dataset: colored-mnist
    view: train
    steps:
      - compute-hardness-tags: {epochs: 20}
      - train-classifier: {method: jtt, hard_tag: bias_conflicting, run_key: jtt, val_view: val}
      - apply-classifier: {view: test, classifier_run: jtt, predictions_field: jtt_predictions}

The pipeline's identity is its ``name`` (default: the file name) and its
dataset: it records, as a run named ``name`` on the dataset, each finished
step with a digest over its own settings and everything upstream (the
settings and results of every earlier step). A rerun skips the finished
prefix and reruns the stale suffix: the first step whose settings or
upstream results changed, and every step after it. Runs the pipeline made are
replaced without ``overwrite``; a run key the pipeline did not make is refused
before anything runs. Every step's inputs (known step and parameters, types,
ranges, choices, fields, models on disk, run keys) are checked, with the
file's line, before the first step runs. An interrupted step resumes where it
stopped (generation and diffusion training pick up their checkpoints).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable

from fairbalance.core import claims, runs
from fairbalance.ops.commands import (CAPABILITIES, UsageError, call_capability, capability,  # noqa: F401
                                      load_view, result_dict, sdk_parameters)
from fairbalance.ops.pipeline_file import (  # noqa: F401  (also pipeline.<name>: reading and checking the file)
    CHOICES, DATA_STEPS, INPUT_FIELDS, MODEL_PATHS, NON_NEGATIVE, OTHER_STEPS, POSITIVE, TOP_LEVEL, UNIT_INTERVAL,
    WRITES_LABEL, Pipeline, Step, available_steps, check_steps, load_pipeline, step_function, step_parameters)


@dataclass
class PipelineResult:
    name: str
    ran: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    dry_run: bool = False
    plan: list[dict] = field(default_factory=list)  # per step: index, command, line, state (done/stale/missing)
    gate_failed: int | None = None  # the index of a check step that failed (the pipeline stopped there)

    def to_dict(self) -> dict:
        return {"name": self.name, "ran": self.ran, "skipped": self.skipped, "results": self.results,
                "dry_run": self.dry_run, "plan": self.plan, "gate_failed": self.gate_failed}


# ----------------------------------------------------------------------------- state of a pipeline on its dataset


def _record(dataset, name: str) -> dict:
    if dataset is None or not dataset.has_run(name):
        return {}
    return {int(k): v for k, v in runs.load_run_results(dataset, name).get("steps", {}).items()}


def _stamp(dataset, step: Step, record: dict | None = None) -> str | None:
    """What identifies this step's current result: its run's timestamp, an export's manifest, or None."""
    key = step.run_key()
    if key is not None:
        return str(dataset.get_run_info(key).timestamp) if dataset is not None and dataset.has_run(key) else None
    if step.command == "export":
        manifest = os.path.join(os.path.abspath(step.params["output_dir"]), "manifest.csv")
        return str(os.path.getmtime(manifest)) if os.path.isfile(manifest) else None
    if step.command in DATA_STEPS:
        return str(dataset.created_at) if dataset is not None else None
    return (record or {}).get("stamp", "")  # a step that leaves no trace: its record is its result


def _other_records(dataset, pipeline_name: str) -> list[tuple[str, dict]]:
    return [(other, _record(dataset, other)) for other in runs.list_runs(dataset, "pipeline") if other != pipeline_name]


def _owner(dataset, pipeline_name: str, key: str) -> tuple[str, dict] | None:
    """The pipeline (other than ``pipeline_name``) whose record made run ``key``, and that step's record."""
    for other in runs.list_runs(dataset, "pipeline"):
        if other == pipeline_name:
            continue
        for rec in _record(dataset, other).values():
            if rec.get("run_key") == key:
                return other, rec
    return None


def plan_pipeline(pipeline: Pipeline, dataset=None, start: Step | None = None, only: Step | None = None) -> list[dict]:
    """Each step's state: ``done`` (finished with these settings and these upstream results), ``stale``
    (finished before, but its settings or an upstream result changed) or ``missing`` (never finished)."""
    record = _record(dataset, pipeline.name)
    chain, plan, broken = "", [], False
    for step in pipeline.steps:
        digest = hashlib.sha1(f"{chain}|{step.digest}".encode()).hexdigest()
        prior = record.get(step.index)
        key = step.run_key()
        stamp = _stamp(dataset, step, prior)
        adopted = None
        if prior is None and not broken and dataset is not None:  # a copied file: the same step (same digest over
            for other, rec in _other_records(dataset, pipeline.name):  # everything upstream) of another pipeline
                mine = rec.get(step.index)
                if mine and mine.get("digest") == digest and mine.get("stamp") == _stamp(dataset, step, mine) \
                        and mine.get("stamp") is not None:
                    prior, adopted, stamp = mine, other, mine.get("stamp")
                    break
        legacy = prior is not None and "stamp" not in prior and prior.get("digest") == step.digest and (
            key is None or stamp is not None)  # recorded before digests chained: done if its own settings match
        if prior is None:
            state = "missing"
        elif legacy and not broken:
            state = "done"
        elif broken or prior.get("digest") != digest or prior.get("stamp") != stamp or (
                key is not None and stamp is None) or prior.get("command") != step.command:
            state = "stale"
        else:
            state = "done"
        broken = broken or state != "done"
        forced = (only is not None and step is only) or (start is not None and step.index >= start.index)
        skip = (only is not None and step is not only) or (start is not None and step.index < start.index)
        plan.append({"index": step.index, "command": step.command, "line": step.line, "run_key": key,
                     "state": state, "digest": digest, "stamp": stamp, "adopted_from": adopted or (
                         "an earlier version" if legacy and state == "done" else None),
                     "owned": prior is not None and prior.get("run_key") == key,
                     "run": not skip and (forced or state != "done")})
        chain = f"{digest}|{stamp}"
    return plan


def _preflight(pipeline: Pipeline, dataset, plan: list[dict]) -> None:
    """The checks that need the database, before anything runs: views, input fields, run keys in use."""
    creates = pipeline.steps[0].command in DATA_STEPS
    if dataset is None and not creates:
        load_view(pipeline.dataset, None)  # raises: no such dataset
    produced: set[str] = set()
    for step, p in zip(pipeline.steps, plan):
        for name in sorted(MODEL_PATHS & set(step.params)):
            value = step.params[name]
            if isinstance(value, str) and value.startswith(("/", "./", "../", "~")) and value not in produced \
                    and os.path.abspath(os.path.expanduser(value)) not in produced \
                    and not os.path.exists(os.path.expanduser(value)):
                raise UsageError(f"{step.where(pipeline.path, name)}: {step.label}: {name} {value} does not exist "
                                 "and no earlier step writes it (no weights are downloaded)")
        if dataset is None:
            _note_outputs(step, produced)
            continue  # the first step creates the dataset: nothing on it to check yet
        if step.command not in DATA_STEPS:
            try:
                load_view(pipeline.dataset, step.view or pipeline.view)
            except UsageError as e:
                raise UsageError(f"{step.where(pipeline.path)}: {step.label}: {e}") from e
            for name in sorted(INPUT_FIELDS & set(step.params)):
                value = step.params[name]
                if not isinstance(value, str) or (step.command in WRITES_LABEL and name in ("label_field",
                                                                                           "attribute_field")):
                    continue
                if not dataset.has_field(value.split(".")[0]) and value not in produced:
                    raise UsageError(f"{step.where(pipeline.path, name)}: {step.label}: {name} '{value}' is not a "
                                     f"field of dataset '{dataset.name}' and no earlier step writes it")
        key = p["run_key"]
        if p["run"] and key is not None and dataset.has_run(key) and not p["owned"] and not step.params.get(
                "overwrite"):
            owner = _owner(dataset, pipeline.name, key)
            made = f"pipeline '{owner[0]}'" if owner else "outside this pipeline"
            raise UsageError(
                f"{step.where(pipeline.path, 'run_key')}: {step.label}: run '{key}' exists on dataset "
                f"'{dataset.name}', made {made}, not by pipeline '{pipeline.name}': give the step another run_key, "
                f"add 'overwrite: true' to it to replace that run"
                + (f", or give this file 'name: {owner[0]}' (the pipeline's identity)" if owner else ""))
        if step.command == "export" and p["run"] and not p["owned"] and not step.params.get("overwrite"):
            folder = os.path.abspath(step.params["output_dir"])
            if os.path.isdir(folder) and os.listdir(folder):
                raise UsageError(f"{step.where(pipeline.path, 'output_dir')}: {step.label}: {folder} is not empty and "
                                 f"this pipeline did not write it: add 'overwrite: true' to the step to replace it")
        _note_outputs(step, produced)


def _note_outputs(step: Step, produced: set) -> None:
    """What a step may write, as far as later steps' checks go: every name and folder it is given or defaults to."""
    accepted = step_parameters(step.command)
    values = [v for v in step.params.values() if isinstance(v, str)]
    values += [p.default for p in accepted.values() if isinstance(p.default, str)]
    produced.update(values)
    produced.update(os.path.abspath(os.path.expanduser(v)) for v in values if v.startswith(("/", "./", "../", "~")))


@claims.exclusive
def run_pipeline(pipeline: Pipeline, dry_run: bool = False, log: Callable[[str], None] = print,
                 start: str | None = None, only: str | None = None) -> PipelineResult:
    """Run the stale suffix of the pipeline; skip the finished prefix; record progress after each step.

    ``start`` (``--from``): rerun that step and every step after it (earlier
    ones are left as they are); ``only`` (``--only``): run just that step.
    ``dry_run`` does every check and prints the plan, running nothing. A
    ``check`` step that fails stops the pipeline (``gate_failed``).
    """
    import fiftyone as fo

    start_step = pipeline.find_step(start) if start else None
    only_step = pipeline.find_step(only) if only else None
    dataset = fo.load_dataset(pipeline.dataset) if fo.dataset_exists(pipeline.dataset) else None
    plan = plan_pipeline(pipeline, dataset, start_step, only_step)
    _preflight(pipeline, dataset, plan)
    result = PipelineResult(pipeline.name, dry_run=dry_run, plan=[
        {k: p[k] for k in ("index", "command", "line", "run_key", "state", "run")} for p in plan])
    done = _record(dataset, pipeline.name)
    config = {"file": pipeline.path, "dataset": pipeline.dataset, "view": pipeline.view,
              "steps": [{"command": s.command, "params": s.params, "view": s.view} for s in pipeline.steps]}
    chain = ""
    for step, p in zip(pipeline.steps, plan):
        key = p["run_key"]
        digest = hashlib.sha1(f"{chain}|{step.digest}".encode()).hexdigest()
        label = f"[{step.index + 1}/{len(pipeline.steps)}] {step.command} (line {step.line})"
        if not p["run"]:
            why = "done before" if p["state"] == "done" else f"{p['state']}, left out (--from/--only)"
            log(f"{label}: {why}" + (f" (run '{key}')" if key else "") + ", skipped")
            result.skipped.append(step.index)
            if p["adopted_from"] and not dry_run:
                done[step.index] = {"command": step.command, "digest": digest, "run_key": key, "stamp": p["stamp"]}
            chain = f"{digest}|{p['stamp']}"
            continue
        if dry_run:
            log(f"{label}: would run ({p['state']}) with {step.params}" + (
                f" on '{step.view or pipeline.view}'" if step.view or pipeline.view else ""))
            chain = f"{digest}|?"
            continue
        log(f"{label}: running ({p['state']})")
        out = _run_step(pipeline, step, dataset, replace=p["owned"] or bool(p["adopted_from"]))
        if step.command in DATA_STEPS:
            dataset = out
            done = {}  # a new dataset: nothing of the old record holds
        result.ran.append(step.index)
        result.results[step.index] = result_dict(out) if step.command not in DATA_STEPS else {
            "dataset": out.name, "num_samples": len(out)}
        dataset.reload()
        if step.command == "check" and not out.passed:
            log(f"{label}: gate FAILED\n{out.format()}")
            result.gate_failed = step.index
            done.pop(step.index, None)
            _save_record(dataset, pipeline, config, done)
            return result
        stamp = _stamp(dataset, step, {"stamp": digest})
        done[step.index] = {"command": step.command, "digest": digest, "run_key": key, "stamp": stamp}
        _save_record(dataset, pipeline, config, done)
        chain = f"{digest}|{stamp}"
        log(f"{label}: finished" + (f" (run '{key}')" if key else ""))
    if result.skipped and not dry_run and any(p["adopted_from"] for p in plan) and dataset is not None:
        _save_record(dataset, pipeline, config, done)
    return result


def _save_record(dataset, pipeline: Pipeline, config: dict, done: dict) -> None:
    record = runs.prepare(dataset, pipeline.name, "pipeline", config, [], overwrite=True)
    record.write(lambda: None)
    record.save_results({"steps": {str(k): v for k, v in done.items()}})


def _run_step(pipeline: Pipeline, step: Step, dataset, replace: bool):
    """Run one step; ``replace``: its run (or export folder) is the pipeline's own, replaced without asking."""
    params = dict(step.params)
    accepted = step_parameters(step.command)
    if step.command in DATA_STEPS:
        fn = step_function(step.command)
        params.setdefault("persistent", True)
        params["overwrite"] = True  # the pipeline's dataset, rebuilt when this step's settings change
        return fn(pipeline.dataset, **params)
    samples = load_view(pipeline.dataset, step.view or pipeline.view)
    key = step.run_key()
    if "overwrite" in accepted and "overwrite" not in params:
        if step.command == "export":
            params["overwrite"] = replace
        elif key is not None and replace and dataset.has_run(key):
            params["overwrite"] = True
    if step.command in CAPABILITIES:
        return call_capability(step.command, samples, params)
    fn = step_function(step.command)
    if "val_samples" in params and isinstance(params["val_samples"], str):
        params["val_samples"] = load_view(pipeline.dataset, params["val_samples"])
    return fn(samples, **params)


def pipeline_status(pipeline: Pipeline) -> dict:
    """Each step's state on the dataset (done / stale / missing) and the dataset's sharded jobs."""
    import fiftyone as fo

    dataset = fo.load_dataset(pipeline.dataset) if fo.dataset_exists(pipeline.dataset) else None
    plan = plan_pipeline(pipeline, dataset)
    return {"name": pipeline.name, "dataset": pipeline.dataset, "file": pipeline.path,
            "steps": [{k: p[k] for k in ("index", "command", "line", "run_key", "state")} for p in plan],
            "sharded_jobs": _sharded_jobs(dataset)}


def _sharded_jobs(dataset) -> list[dict]:
    from fairbalance.core import sharding

    if dataset is None:
        return []
    return [{k: j[k] for k in ("run_key", "function", "num_shards", "shards_done", "merged", "progress")} |
            {"shards": [{k: s[k] for k in ("shard", "state", "done", "total")} for s in j["shards"]]}
            for j in sharding.list_jobs(dataset)]


def dataset_status(name: str) -> dict:
    """The pipelines recorded on a dataset (their steps' records) and its sharded jobs."""
    dataset = load_view(name, None)
    pipes = []
    for key in runs.list_runs(dataset, "pipeline"):
        config = runs.get_run_config(dataset, key)
        rec = _record(dataset, key)
        pipes.append({"name": key, "file": config.get("file"), "steps": [
            {"index": i, "command": s["command"], "line": None, "run_key": s.get("run_key"),
             "state": "done" if s.get("run_key") is None or dataset.has_run(s["run_key"]) else "missing"}
            for i, s in sorted(rec.items())]})
    return {"dataset": name, "pipelines": pipes, "sharded_jobs": _sharded_jobs(dataset)}

