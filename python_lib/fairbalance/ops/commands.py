"""Capabilities as commands, shared by the command line (``ops.cli``) and pipeline files (``ops.pipeline``).

Which SDK function a command runs (made from the capability table), its
parameters, the view it runs on, and calling it with progress on a terminal.
"""

from __future__ import annotations

import inspect
import sys

from fairbalance.core import capabilities, validation

# command -> capability name, for the capabilities that run on a dataset or view, in the order of the road
_COMMANDS = {c.command: c.name for c in capabilities.TABLE if c.command and c.command_kind == "dataset"}
# CLI name -> (module, SDK function)
CAPABILITIES = {cmd: tuple(capabilities.BY_NAME[name].function.split(":")) for cmd, name in _COMMANDS.items()}
# SDK parameters that take a view besides the one the command runs on: given as a saved view's name or a tag
VIEW_PARAMS = {"val_samples": "val_view", "generated_samples": "generated_view", "test_samples": "test_view",
               "reference_samples": "reference_view"}
# not flags: the view the command runs on (DATASET / --view: the SDK's first parameter, ``samples``, or
# ``real_samples`` for measure_realism) and the progress callback (the command's own)
SKIPPED = {"samples", "real_samples", "progress"}


class UsageError(validation.FairBalanceError):
    """Bad command-line or pipeline input (exit code 2)."""


def capability(name: str):
    """The SDK function behind a subcommand (an entry that does not import is an error, never skipped)."""
    return capabilities.BY_NAME[_COMMANDS[name]].load()


def sdk_parameters(fn) -> dict[str, inspect.Parameter]:
    """The parameters a subcommand or pipeline step takes (without ``samples`` and ``progress``)."""
    return {n: p for n, p in inspect.signature(fn).parameters.items() if n not in SKIPPED}


def load_view(dataset_name: str, view: str | None):
    """The dataset, or one of its saved views, or its samples with a tag; a clear error for anything else."""
    import fiftyone as fo

    if not fo.dataset_exists(dataset_name):
        raise UsageError(f"no dataset named '{dataset_name}' (fiftyone datasets list shows them)")
    dataset = fo.load_dataset(dataset_name)
    if view is None:
        return dataset
    if view in dataset.list_saved_views():
        return dataset.load_saved_view(view)
    if view in dataset.distinct("tags"):
        return dataset.match_tags(view)
    raise UsageError(f"'{view}' is neither a saved view nor a tag of dataset '{dataset_name}'")


def progress_for_terminal(label: str):
    """``None`` (FiftyOne's bars) on a terminal; elsewhere a callback that prints a line per 10%."""
    import fiftyone as fo

    if sys.stderr.isatty():
        return None
    state = {"last": -1}

    def report(pb):
        done = int(10 * pb.progress)
        if done > state["last"]:
            state["last"] = done
            print(f"{label}: {10 * done}%", file=sys.stderr, flush=True)

    return fo.report_progress(report, dt=0.0)


def call_capability(name: str, samples, params: dict, dataset=None):
    """Call a capability on ``samples`` with ``params`` (SDK names); views given by name are resolved."""
    fn = capability(name)
    accepted = sdk_parameters(fn)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise UsageError(f"{name} takes no parameter(s) {unknown}; it takes {sorted(accepted)}")
    params = dict(params)
    for pname in VIEW_PARAMS:
        if isinstance(params.get(pname), str):
            params[pname] = load_view(samples._root_dataset.name, params[pname])
    if "progress" in inspect.signature(fn).parameters:
        params["progress"] = progress_for_terminal(name)
    return fn(samples, **params)


def result_dict(result) -> dict:
    if result is None:
        return {}
    if hasattr(result, "to_dict"):
        return result.to_dict()
    return {"result": result}
