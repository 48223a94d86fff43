"""The ``fairbalance`` command: every capability as a subcommand, a pipeline runner, a balance gate, export.

Subcommands are built from the SDK functions' own signatures, so the
arguments are the SDK's (``--label-field``, ``--top-k``, ...), with their
defaults, and never drift. ``DATASET`` is a FiftyOne dataset name;
``--view`` a saved view of it or a sample tag. ``--json`` prints the result
as JSON (and nothing else on stdout). Progress shows as bars on a terminal
and as plain lines otherwise.

Exit codes: 0 ok; 1 a balance gate failed; 2 usage or config error (unknown
dataset, view, parameter or step, a value out of range, a bad pipeline file,
a run key or folder taken: fix the input); 3 busy (a run key, field or folder
is in use by a running operation: retry later); 4 runtime failure (anything
else: see the message and traceback).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys

from fairbalance.core import validation
from fairbalance.ops.commands import (CAPABILITIES, SKIPPED, VIEW_PARAMS, UsageError, call_capability, capability,
                                      load_view, progress_for_terminal, result_dict, sdk_parameters)

EXIT_OK, EXIT_GATE, EXIT_BAD_INPUT, EXIT_BUSY, EXIT_FAILURE = 0, 1, 2, 3, 4
EXIT_CODES_HELP = ("exit codes: 0 ok, 1 a balance gate failed, 2 usage or config error (fix the input), "
                   "3 busy: in use by a running operation (retry), 4 runtime failure")


def _int_or_float(text: str):
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def _param_kind(param: inspect.Parameter):
    """``(argparse kwargs, converter)`` for one SDK parameter, from its annotation and default."""
    ann = str(param.annotation).replace(" ", "")
    default = param.default
    if isinstance(default, bool) or ann.startswith("bool"):
        return {"action": argparse.BooleanOptionalAction}, None
    if ann.startswith(("list[", "tuple[", "Sequence[")):
        inner = ann.split("[", 1)[1]
        conv = int if inner.startswith("int") else float if inner.startswith("float") else str
        return {"nargs": "+", "type": conv}, None
    if ann.startswith(("dict", "Mapping")):
        return {"type": json.loads, "metavar": "JSON"}, None
    kinds = set(ann.split("|"))
    if {"int", "float"} <= kinds:
        return {"type": _int_or_float}, None
    if isinstance(default, int) or "int" in kinds:
        return {"type": int}, None
    if isinstance(default, float) or "float" in kinds:
        return {"type": float}, None
    return {"type": str}, None


def _add_capability(sub, name: str, fn) -> None:
    doc = inspect.getdoc(fn) or ""
    parser = sub.add_parser(name, help=doc.splitlines()[0] if doc else name, description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_dataset_args(parser)
    for pname, param in sdk_parameters(fn).items():
        flag = "--" + VIEW_PARAMS.get(pname, pname).replace("_", "-")
        if pname in VIEW_PARAMS:
            parser.add_argument(flag, dest=pname, help="a saved view or tag of the dataset")
            continue
        kwargs, _ = _param_kind(param)
        required = param.default is inspect.Parameter.empty
        shown = None if required else param.default
        parser.add_argument(flag, dest=pname, required=required, default=argparse.SUPPRESS,
                            help=f"default: {shown!r}" if not required else "required", **kwargs)
    parser.set_defaults(handler=_run_capability, capability=name)


def _add_dataset_args(parser) -> None:
    parser.add_argument("dataset", help="FiftyOne dataset name")
    parser.add_argument("--view", help="a saved view of the dataset, or a sample tag (default: all samples)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _print_result(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result_dict(result), default=str, indent=1))
    elif callable(getattr(result, "format", None)):  # a text table (the gate); ExportResult.format is a field
        print(result.format())
    else:
        for key, value in result_dict(result).items():
            if isinstance(value, float):
                value = f"{value:.4g}" if math.isfinite(value) else value
            elif isinstance(value, (list, dict)) and len(json.dumps(value, default=str)) > 200:
                value = f"<{len(value)} entries; --json shows them>"
            print(f"{key}: {value}")
    for note in result_dict(result).get("warnings") or [] if not as_json else []:
        print(f"fairbalance: warning: {note}", file=sys.stderr)


def _run_capability(args) -> int:
    skip = {"handler", "capability", "dataset", "view", "json", "command"}
    params = {k: v for k, v in vars(args).items() if k not in skip}
    result = call_capability(args.capability, load_view(args.dataset, args.view), params)
    _print_result(result, args.json)
    return EXIT_OK


def _run_check(args) -> int:
    from fairbalance.ops.gate import check_balance

    result = check_balance(load_view(args.dataset, args.view), args.field, args.min_normalized_entropy,
                           args.max_imbalance_ratio, args.min_worst_group_accuracy, args.evaluation_run,
                           args.report_dir)
    _print_result(result, args.json)
    return EXIT_OK if result.passed else EXIT_GATE


def _run_export(args) -> int:
    from fairbalance.ops.export import export_samples

    result = export_samples(load_view(args.dataset, args.view), args.output, args.format, args.label_field,
                            args.include_generated, args.exclude_tags, args.weights_field,
                            overwrite=args.overwrite, progress=progress_for_terminal("export"))
    _print_result(result, args.json)
    return EXIT_OK


def _run_pipeline(args) -> int:
    from fairbalance.ops.pipeline import run_pipeline
    from fairbalance.ops.pipeline_file import load_pipeline

    pipeline = load_pipeline(args.file, args.overrides)
    if args.queue:
        return _queue_pipeline(pipeline, args)
    out = sys.stderr if args.json else sys.stdout  # with --json, stdout is only the JSON result
    result = run_pipeline(pipeline, dry_run=args.dry_run, log=lambda line: print(line, file=out, flush=True),
                          start=args.start, only=args.only)
    if args.json:
        print(json.dumps(result.to_dict(), default=str, indent=1))
    return EXIT_GATE if result.gate_failed is not None else EXIT_OK


def _run_status(args) -> int:
    import os

    from fairbalance.ops.pipeline import dataset_status, pipeline_status
    from fairbalance.ops.pipeline_file import load_pipeline

    status = pipeline_status(load_pipeline(args.target)) if os.path.isfile(args.target) else \
        dataset_status(args.target)
    if args.json:
        print(json.dumps(status, default=str, indent=1))
        return EXIT_OK
    for pipe in [status] if "steps" in status else status["pipelines"]:
        print(f"pipeline '{pipe['name']}'" + (f" on '{status['dataset']}'" if "dataset" in status else "")
              + (f" ({pipe['file']})" if pipe.get("file") else ""))
        for s in pipe["steps"]:
            line = f", line {s['line']}" if s.get("line") else ""
            print(f"  {s['index'] + 1}. {s['command']}{line}: {s['state']}"
                  + (f" (run '{s['run_key']}')" if s.get("run_key") else ""))
    for job in status["sharded_jobs"]:
        states = ", ".join(f"{s['shard']}:{s['state']}" for s in job["shards"])
        print(f"sharded job '{job['run_key']}' ({job['function']}): {job['shards_done']}/{job['num_shards']} shards "
              f"done, {100 * job['progress']:.0f}%, {'merged' if job['merged'] else 'not merged'} [{states}]")
    return EXIT_OK


def _run_queue_sharded(args) -> int:
    from fairbalance.core.sharding import queue_sharded

    kwargs = {}
    for item in args.params or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UsageError(f"'{item}': give the function's parameters as NAME=VALUE (the value read as YAML)")
        import yaml

        kwargs[key.replace("-", "_")] = yaml.safe_load(raw)
    job = queue_sharded(load_view(args.dataset, args.view), args.function, args.num_shards, run_key=args.run_key,
                        overwrite=args.overwrite, then=args.then, **kwargs)
    if args.json:
        print(json.dumps(job.to_dict(), default=str, indent=1))
    else:
        print(f"queued {len(job.queued)} shard(s) of '{job.run_key}' ({job.function}); requeued "
              f"{len(job.requeued)}; workers (fiftyone delegated launch) run them; "
              f"fairbalance sharded-status {args.dataset} {job.run_key} follows them")
    return EXIT_OK


def _run_sharded_status(args) -> int:
    from fairbalance.core.sharding import sharded_status

    status = sharded_status(load_view(args.dataset, None), args.run_key)
    if args.json:
        print(json.dumps(status, default=str, indent=1))
        return EXIT_OK
    print(f"'{status['run_key']}' ({status['function']}): {status['shards_done']}/{status['num_shards']} shards "
          f"done, {status['num_done']}/{status['num_items']} items, {'merged' if status['merged'] else 'not merged'}")
    for s in status["shards"]:
        print(f"  shard {s['shard']}: {s['state']} {s['done']}/{s['total']} (attempts {s['attempts']}, "
              f"operation {s['operation']}: {s['operation_state']})")
    return EXIT_OK


def _queue_pipeline(pipeline, args) -> int:
    """Queue the whole file as one delegated ``run_pipeline`` operation (its steps must run in order)."""
    import fiftyone.operators as foo

    from fairbalance.core import folders

    if args.overrides or args.start or args.only:
        raise UsageError("--queue runs the file as it is: edit the file instead of overrides, --from or --only")
    load_view(pipeline.dataset, None)
    queued = folders.copy_pipeline(pipeline.path, pipeline.dataset)  # the operator reads only the pipelines folder
    res = foo.execute_operator("@fairbalance/fairbalance/run_pipeline", ctx={
        "dataset": pipeline.dataset, "params": {"file": queued, "dry_run": args.dry_run}},
        request_delegation=True)
    if res.error:
        raise UsageError(f"could not queue the pipeline: {res.error}")
    print(f"queued {queued} (a copy of {pipeline.path}) as a delegated operation on '{pipeline.dataset}': a worker "
          "(fiftyone delegated launch) runs it; fiftyone delegated list shows it")
    return EXIT_OK


def _run_check_wordnet(args) -> int:
    from fairbalance.find.resources import main

    return main(["check-wordnet"])


def _summary(name: str) -> str:
    """A capability's first docstring line, read from its source (no import: ``--help`` stays fast)."""
    import ast
    import importlib.util

    module, fn = CAPABILITIES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return name
    with open(spec.origin) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == fn:
            doc = ast.get_docstring(node) or name
            return doc.splitlines()[0]
    return name


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; capability subcommands get their SDK parameters only for ``command`` (the one run), so
    ``fairbalance --help`` imports no capability (torch, FiftyOne)."""
    parser = argparse.ArgumentParser(prog="fairbalance", description=__doc__.split("\n\n")[0],
                                     epilog=EXIT_CODES_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a pipeline file: the stale steps, in order (finished ones are skipped)",
                         epilog=EXIT_CODES_HELP)
    run.add_argument("file", help="pipeline YAML file")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="override the file: STEP.PARAM=VALUE (STEP: number, command or run key), view=, dataset=")
    run.add_argument("--dry-run", action="store_true",
                     help="check everything and print the plan, run nothing (exit 2 when the run would fail)")
    run.add_argument("--from", dest="start", metavar="STEP", help="rerun STEP and every step after it")
    run.add_argument("--only", metavar="STEP", help="run only STEP (later steps then show as stale)")
    run.add_argument("--queue", action="store_true",
                     help="queue it for FiftyOne's delegated workers instead of running it here")
    run.add_argument("--json", action="store_true", help="print the result as JSON (the log goes to stderr)")
    run.set_defaults(handler=_run_pipeline)
    status = sub.add_parser("status", help="the steps of a pipeline (done / stale / missing) and sharded jobs")
    status.add_argument("target", help="a pipeline file, or a dataset name (every pipeline recorded on it)")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=_run_status)
    check = sub.add_parser("check", help="balance gate: exit 1 when a threshold is crossed", epilog=EXIT_CODES_HELP)
    _add_dataset_args(check)
    check.add_argument("--field", required=True, help="the label field to check, e.g. sa_cluster")
    check.add_argument("--min-normalized-entropy", type=float)
    check.add_argument("--max-imbalance-ratio", type=float)
    check.add_argument("--min-worst-group-accuracy", type=float)
    check.add_argument("--evaluation-run", help="an evaluate-classifier run key (for worst-group accuracy)")
    check.add_argument("--report-dir", help="write report.md, report.json and counts.png here")
    check.set_defaults(handler=_run_check)
    export = sub.add_parser("export", help="export a view for training outside FiftyOne, with a provenance manifest")
    _add_dataset_args(export)
    export.add_argument("--output", required=True, help="export folder (must be empty, or --overwrite)")
    export.add_argument("--format", default="image-classification-dir",
                        choices=["image-classification-dir", "fiftyone", "csv-manifest"])
    export.add_argument("--label-field", default="ground_truth")
    export.add_argument("--include-generated", action=argparse.BooleanOptionalAction, default=True)
    export.add_argument("--exclude-tags", nargs="+", help="leave out samples with these tags, e.g. low_quality")
    export.add_argument("--weights-field", help="a numeric field for the manifest's weight column")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(handler=_run_export)
    queue = sub.add_parser("queue-sharded", help="queue a job as N delegated operations, one per shard")
    _add_dataset_args(queue)
    queue.add_argument("function", help="what to shard, e.g. compute_sa_features, compute_hardness_tags, "
                                        "generate_balanced")
    queue.add_argument("params", nargs="*", metavar="NAME=VALUE", help="the function's parameters (YAML values)")
    queue.add_argument("--num-shards", type=int, required=True)
    queue.add_argument("--run-key")
    queue.add_argument("--then", help="what runs on the merged result, e.g. compute_pseudo_labels")
    queue.add_argument("--overwrite", action="store_true")
    queue.set_defaults(handler=_run_queue_sharded)
    sstatus = sub.add_parser("sharded-status", help="each shard's state and progress of a sharded run")
    sstatus.add_argument("dataset", help="FiftyOne dataset name")
    sstatus.add_argument("run_key")
    sstatus.add_argument("--json", action="store_true")
    sstatus.set_defaults(handler=_run_sharded_status)
    wordnet = sub.add_parser("check-wordnet", help="check the WordNet 3.0 files NLTK will read")
    wordnet.set_defaults(handler=_run_check_wordnet)
    for name in CAPABILITIES:
        if name != command:
            sub.add_parser(name, help=_summary(name), add_help=False)  # listed; built fully when it is the command
            continue
        _add_capability(sub, name, capability(name))
    return parser


def _logs_to_stderr() -> None:
    """FiftyOne logs to stdout; a command's stdout is its result (``--json`` must parse), so logs go to stderr."""
    import logging

    import fiftyone  # noqa: F401  (configures its logger)

    for handler in logging.getLogger("fiftyone").handlers:
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is sys.stdout:
            handler.setStream(sys.stderr)


def _command(argv: list[str]) -> str | None:
    """The subcommand word of ``argv`` (the first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _in_cli_words(message: str, command: str) -> str:
    """The SDK's ``overwrite=True`` said the way this command takes it (a flag, or the pipeline step's key)."""
    if command == "run":
        return message.replace("pass overwrite=True", "add 'overwrite: true' to the step").replace(
            "overwrite=True", "'overwrite: true' on the step")
    return message.replace("pass overwrite=True", "pass --overwrite").replace("overwrite=True", "--overwrite")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    from fairbalance.core.claims import ClaimError
    from fairbalance.core.models import ModelNotFoundError

    try:
        _logs_to_stderr()
        return args.handler(args)
    except ClaimError as e:  # in use by a running operation: retry later
        print(f"fairbalance: busy: {e}", file=sys.stderr)
        return EXIT_BUSY
    except (validation.FairBalanceError, ModelNotFoundError) as e:  # bad input, a key taken, absent weights
        print(f"fairbalance: error: {_in_cli_words(str(e), args.command)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 (a runtime failure: its own exit code, with the traceback)
        import traceback

        traceback.print_exc()
        print(f"fairbalance: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
