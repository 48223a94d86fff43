"""Pipeline files, read and checked: the YAML file's steps with their lines, every parameter checked (types,
ranges, choices, models on disk, run-key collisions) before anything runs. Running them: :mod:`fairbalance.ops.pipeline`."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
from dataclasses import dataclass, field

from fairbalance.core import capabilities, runs, validation
from fairbalance.ops.commands import CAPABILITIES, UsageError, capability, sdk_parameters

TOP_LEVEL = {"dataset", "view", "name", "steps"}
# steps that are not capabilities on samples: data creation (the pipeline's dataset), the gate, export
# (from the capability table: step -> capability name)
DATA_STEPS = {c.command: c.name for c in capabilities.TABLE if c.command_kind == "creates"}
OTHER_STEPS = {c.command: c.name for c in capabilities.TABLE if c.command_kind == "own" and c.command != "run"}
# parameter values a step accepts, checked before anything runs: (step, parameter) -> (module, constant) or values
CHOICES = {
    ("train-classifier", "method"): ("fairbalance.train.training", "METHODS"),
    ("filter-generated", "method"): ("fairbalance.generate.filtering", "SCORE_METHODS"),
    ("finetune-per-group", "method"): ("fairbalance.generate.lora.adapters", "METHODS"),
    ("generate-balanced", "mode"): ("equal", "fill", "cells"),
    ("export", "format"): ("fairbalance.ops.export", "FORMATS"),
}
POSITIVE = {"epochs", "batch_size", "top_k", "per_class", "per_cell", "total", "num_inference_steps", "head_epochs",
            "projection_dim", "checkpoint_every", "num_images", "max_steps", "train_per_class", "test_per_class",
            "num_classes"}
NON_NEGATIVE = {"seed", "num_workers", "num_val", "num_test"}
UNIT_INTERVAL = {"conflict_ratio", "max_synthetic_fraction", "ema", "q", "min_normalized_entropy",
                 "min_worst_group_accuracy", "edit_strength"}
MODEL_PATHS = {"model", "base_model", "classifier", "model_dir"}  # a value that is a path must exist (or be made)
INPUT_FIELDS = {"label_field", "attribute_field", "aligned_field", "weights_field", "weight_field"}
WRITES_LABEL = {"compute-pseudo-labels", "audit-balance"}  # their label/attribute fields are outputs


def step_function(command: str):
    """The SDK function behind a pipeline step (None when unknown; an entry that does not import is an error)."""
    if command in CAPABILITIES:
        return capability(command)
    name = {**DATA_STEPS, **OTHER_STEPS}.get(command)
    return None if name is None else capabilities.BY_NAME[name].load()


def step_parameters(command: str) -> dict[str, inspect.Parameter]:
    params = sdk_parameters(step_function(command))
    if command in DATA_STEPS:
        params.pop("name", None)  # the pipeline's dataset
    return params


def available_steps() -> list[str]:
    return [c for c in [*DATA_STEPS, *CAPABILITIES, *OTHER_STEPS] if step_function(c) is not None]


@dataclass
class Step:
    index: int
    line: int
    command: str
    params: dict
    view: str | None
    param_lines: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """A hash of this step's own settings (the pipeline chains it with everything upstream)."""
        payload = json.dumps({"command": self.command, "params": self.params, "view": self.view}, sort_keys=True,
                             default=str)
        return hashlib.sha1(payload.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"step {self.index + 1} '{self.command}'"

    def where(self, path: str, param: str | None = None) -> str:
        return f"{path}, line {self.param_lines.get(param, self.line)}"

    def run_key(self) -> str | None:
        """The run this step records (None for steps that record none: data, check, export, a report without
        a key)."""
        if self.command in DATA_STEPS or self.command in OTHER_STEPS:
            return None
        accepted = step_parameters(self.command)
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

    def find_step(self, ref: str) -> Step:
        """A step by its number (1-based), its command (when only one step has it) or its run key."""
        ref = str(ref)
        if ref.isdigit() and 1 <= int(ref) <= len(self.steps):
            return self.steps[int(ref) - 1]
        hits = [s for s in self.steps if s.command == ref] or [s for s in self.steps if s.run_key() == ref]
        if len(hits) != 1:
            names = [f"{s.index + 1}:{s.command}" + (f"({s.run_key()})" if s.run_key() else "") for s in self.steps]
            raise UsageError(f"{'no' if not hits else 'more than one'} step '{ref}' in {self.path}: name a step by "
                             f"number, command or run key: {names}")
        return hits[0]



def _type_error(value, param: inspect.Parameter) -> str | None:
    """Why ``value`` does not fit the parameter's annotation (None when it fits or cannot be told)."""
    ann = param.annotation if isinstance(param.annotation, str) else str(param.annotation)
    ann = ann.replace(" ", "").replace("typing.", "")
    kinds = set(re.split(r"\|", ann)) if ann and ann != "<class'inspect._empty'>" else set()
    if not kinds and param.default is not inspect.Parameter.empty and param.default is not None:
        kinds = {type(param.default).__name__}
    if value is None:
        return None if "None" in kinds or param.default is None or not kinds else "is required (not null)"
    checks = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str)}
    known = [k for k in kinds if k in checks or k.startswith(("list", "tuple", "Sequence", "dict"))]
    if not known or len(known) < len(kinds - {"None"}):  # an annotation we do not model: the function checks
        return None
    for k in known:
        if k in checks and checks[k](value):
            return None
        if k.startswith(("list", "tuple", "Sequence")) and isinstance(value, list):
            return None
        if k.startswith("dict") and isinstance(value, dict):
            return None
    want = " or ".join(sorted(k.split("[")[0] for k in known))
    return f"must be {want}, got {value!r}"


def _value_error(command: str, name: str, value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if (command, name) in CHOICES and value is not None:
            choices = CHOICES[(command, name)]
            if isinstance(choices[0], str) and choices[0].startswith("fairbalance."):
                choices = getattr(importlib.import_module(choices[0]), choices[1])
            if value not in choices:
                return f"must be one of {list(choices)}, got {value!r}"
        if isinstance(value, str) and value.startswith("local-dir:"):
            folder = value[len("local-dir:"):]
            if not os.path.isdir(folder):
                return f"model folder {folder} does not exist (no weights are downloaded)"
        return None
    if name in POSITIVE and value < 1:
        return f"must be >= 1, got {value!r}"
    if name in NON_NEGATIVE and value < 0:
        return f"must be >= 0, got {value!r}"
    if name in UNIT_INTERVAL and not 0 <= value <= 1:
        return f"must be in [0, 1], got {value!r}"
    return None


def check_steps(pipeline: Pipeline) -> None:
    """The checks that need no database: parameter types, ranges, choices, models on disk, run-key collisions."""
    keys: dict[str, Step] = {}
    for step in pipeline.steps:
        accepted = step_parameters(step.command)
        for name, value in step.params.items():
            if name == "val_samples":
                continue
            problem = _type_error(value, accepted[name]) or _value_error(step.command, name, value)
            if problem:
                raise UsageError(f"{step.where(pipeline.path, name)}: {step.label}: {name} {problem}")
        missing = [n for n, p in accepted.items() if p.default is inspect.Parameter.empty and n not in step.params]
        if missing:
            raise UsageError(f"{step.where(pipeline.path)}: {step.label} needs {missing}")
        if step.command in DATA_STEPS and step.index != 0:
            raise UsageError(f"{step.where(pipeline.path)}: {step.label} creates the dataset: it is the first step")
        key = step.run_key()
        if key is not None:
            runs.validate_run_key(key)
            if key in keys:
                raise UsageError(f"{step.where(pipeline.path, 'run_key')}: {step.label} records run '{key}' like "
                                 f"{keys[key].label} (line {keys[key].line}): give one of them another run_key")
            keys[key] = step


def load_pipeline(path: str, overrides: list[str] | tuple = ()) -> Pipeline:
    """Read and check a pipeline file; errors name the file and line.

    ``overrides``: ``KEY=VALUE`` strings (Hydra style) applied over the file:
    ``dataset=..``, ``view=..``, ``name=..`` or ``STEP.PARAM=VALUE`` with
    ``STEP`` a step's number, command or run key; the value is read as YAML.
    """
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
        if step_function(command) is None:
            raise UsageError(f"{where(node)}: unknown step '{command}'; steps are {available_steps()}")
        if params is not None and not isinstance(params, dict):
            raise UsageError(f"{where(node)}: the parameters of '{command}' are a mapping, not {params!r}")
        params = dict(params or {})
        pnode = node.value[0][1]
        lines = {k.value: k.start_mark.line + 1 for k, _ in pnode.value} if isinstance(pnode, yaml.MappingNode) else {}
        view = params.pop("view", None)
        if "val_view" in params:
            params["val_samples"] = params.pop("val_view")
            lines["val_samples"] = lines.get("val_view", node.start_mark.line + 1)
        accepted = step_parameters(command)
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise UsageError(f"{path}, line {lines.get(unknown[0], node.start_mark.line + 1)}: step '{command}' has "
                             f"no parameter(s) {unknown}; it takes {sorted(accepted)}")
        steps.append(Step(i, node.start_mark.line + 1, command, params, view, lines))
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = data.get("name") or f"pipeline_{stem}"
    pipeline = Pipeline(os.path.abspath(path), str(name), str(data["dataset"]), data.get("view"), steps)
    for item in overrides:
        _apply_override(pipeline, item)
    try:
        runs.validate_run_key(pipeline.name)
    except validation.FairBalanceError as e:
        raise UsageError(f"{path}: name: {e}") from e
    check_steps(pipeline)
    return pipeline


def _apply_override(pipeline: Pipeline, item: str) -> None:
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UsageError(f"override '{item}': write KEY=VALUE, e.g. train-classifier.epochs=5 or view=test")
    value = yaml.safe_load(raw) if raw else None
    if key in ("dataset", "view", "name"):
        setattr(pipeline, key, value if key == "view" else str(value))
        return
    ref, dot, param = key.rpartition(".")
    if not dot:
        raise UsageError(f"override '{item}': KEY is dataset, view, name or STEP.PARAM")
    step = pipeline.find_step(ref)
    if param == "view":
        step.view = value
        return
    if param == "val_view":
        param = "val_samples"
    if param not in step_parameters(step.command):
        raise UsageError(f"override '{item}': {step.label} has no parameter '{param}'")
    step.params[param] = value
    step.param_lines[param] = f"{step.line} (overridden by '{item}')"
