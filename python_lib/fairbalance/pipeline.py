"""Pipeline files: audit -> tag -> generate -> train -> verify from one YAML file, resumable.

A pipeline file names a dataset, optionally a default view (a saved view or a
tag), and steps, each a capability (the command-line name) with the SDK's
parameters::

    dataset: colored-mnist
    view: train
    steps:
      - compute-hardness-tags: {epochs: 20}
      - train-classifier: {method: jtt, hard_tag: bias_conflicting, run_key: jtt, val_view: val}
      - apply-classifier: {view: test, classifier_run: jtt, predictions_field: jtt_predictions}

Every step is checked (known step, known parameters, with the line they are
on) before the first one runs. Each step records its own run, and the
pipeline records which steps finished, with a hash of their settings, as a
run of its own (``name``, default ``pipeline_<file name>``): a rerun skips
steps that finished with the same settings and whose run still exists, and
resumes the one that was interrupted (generation and diffusion training
pick up where they stopped).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from fairbalance import claims, runs
from fairbalance.cli import CAPABILITIES, UsageError, call_capability, capability, load_view, result_dict, \
    sdk_parameters

TOP_LEVEL = {"dataset", "view", "name", "steps"}


@dataclass
class Step:
    index: int
    line: int
    command: str
    params: dict
    view: str | None

    @property
    def digest(self) -> str:
        payload = json.dumps({"command": self.command, "params": self.params, "view": self.view}, sort_keys=True,
                             default=str)
        return hashlib.sha1(payload.encode()).hexdigest()

    def run_key(self) -> str | None:
        """The run this step records (None for steps that record none, e.g. a report without a key)."""
        fn = capability(self.command)
        accepted = inspect.signature(fn).parameters
        if "run_key" in self.params:
            return self.params["run_key"]
        default = accepted["run_key"].default if "run_key" in accepted else None
        if default is None and self.command == "apply-classifier":
            return self.params.get("predictions_field", accepted["predictions_field"].default)
        return default


@dataclass
class Pipeline:
    path: str
    name: str
    dataset: str
    view: str | None
    steps: list[Step]


@dataclass
class PipelineResult:
    name: str
    ran: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    results: dict = field(default_factory=dict)
    dry_run: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "ran": self.ran, "skipped": self.skipped, "results": self.results,
                "dry_run": self.dry_run}


def load_pipeline(path: str) -> Pipeline:
    """Read and check a pipeline file; errors name the file and line."""
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"no pipeline file {path}")
    with open(path) as f:
        text = f.read()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML: {e}") from e

    def where(node) -> str:
        return f"{path}, line {node.start_mark.line + 1}"

    if not isinstance(root, yaml.MappingNode):
        raise UsageError(f"{path}: a pipeline is a mapping with 'dataset' and 'steps'")
    top = {k.value: (k, v) for k, v in root.value}
    for key, (knode, _) in top.items():
        if key not in TOP_LEVEL:
            raise UsageError(f"{where(knode)}: unknown key '{key}'; a pipeline has {sorted(TOP_LEVEL)}")
    if "dataset" not in top or "steps" not in top:
        raise UsageError(f"{path}: a pipeline needs 'dataset' and 'steps'")
    data = yaml.safe_load(text)
    steps_node = top["steps"][1]
    if not isinstance(steps_node, yaml.SequenceNode) or not steps_node.value:
        raise UsageError(f"{where(steps_node)}: 'steps' is a non-empty list")
    steps = []
    for i, (node, raw) in enumerate(zip(steps_node.value, data["steps"])):
        if not isinstance(raw, dict) or len(raw) != 1:
            raise UsageError(f"{where(node)}: a step is one 'command: {{parameters}}' entry")
        command, params = next(iter(raw.items()))
        if command not in CAPABILITIES or capability(command) is None:
            available = [c for c in CAPABILITIES if capability(c) is not None]
            raise UsageError(f"{where(node)}: unknown step '{command}'; steps are {available}")
        params = dict(params or {})
        view = params.pop("view", None)
        if "val_view" in params:
            params["val_samples"] = params.pop("val_view")
        accepted = sdk_parameters(capability(command))
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            pnode = next((k for k, _ in node.value[0][1].value if k.value in unknown), node) \
                if isinstance(node.value[0][1], yaml.MappingNode) else node
            raise UsageError(f"{where(pnode)}: step '{command}' has no parameter(s) {unknown}")
        steps.append(Step(i, node.start_mark.line + 1, command, params, view))
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = data.get("name") or f"pipeline_{stem}"
    runs.validate_run_key(name)
    return Pipeline(os.path.abspath(path), name, str(data["dataset"]), data.get("view"), steps)


@claims.exclusive
def run_pipeline(pipeline: Pipeline, dry_run: bool = False, log: Callable[[str], None] = print) -> PipelineResult:
    """Run the steps in order; skip those finished with the same settings; record progress after each."""
    dataset = load_view(pipeline.dataset, None)
    for step in pipeline.steps:  # every view exists before anything runs
        load_view(pipeline.dataset, step.view or pipeline.view)
    done = {}
    if dataset.has_run(pipeline.name):
        done = {int(k): v for k, v in runs.load_run_results(dataset, pipeline.name).get("steps", {}).items()}
    result = PipelineResult(pipeline.name, dry_run=dry_run)
    config = {"file": pipeline.path, "dataset": pipeline.dataset, "view": pipeline.view,
              "steps": [{"command": s.command, "params": s.params, "view": s.view} for s in pipeline.steps]}
    for step in pipeline.steps:
        key = step.run_key()
        prior = done.get(step.index)
        finished = prior is not None and prior["digest"] == step.digest and key is not None and dataset.has_run(key)
        label = f"[{step.index + 1}/{len(pipeline.steps)}] {step.command} (line {step.line})"
        if finished:
            log(f"{label}: done before (run '{key}'), skipped")
            result.skipped.append(step.index)
            continue
        if dry_run:
            log(f"{label}: would run with {step.params}" + (f" on '{step.view or pipeline.view}'"
                                                             if step.view or pipeline.view else ""))
            continue
        log(f"{label}: running")
        samples = load_view(pipeline.dataset, step.view or pipeline.view)
        out = call_capability(step.command, samples, step.params)
        result.ran.append(step.index)
        result.results[step.index] = result_dict(out)
        done[step.index] = {"command": step.command, "digest": step.digest, "run_key": key}
        record = runs.prepare(dataset, pipeline.name, "pipeline", config, [], overwrite=True)
        record.write(lambda: None)
        record.save_results({"steps": {str(k): v for k, v in done.items()}})
        log(f"{label}: finished" + (f" (run '{key}')" if key else ""))
    return result
