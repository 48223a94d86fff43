"""Operator: run a pipeline file (``fairbalance run``'s steps) on FiftyOne's delegated workers."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import load_pipeline, run_pipeline

from ._common import streams_progress
from ._common import as_text_block, operator_config, pipeline_file, result_view


class RunPipeline(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "run_pipeline", "fairbalance: run a pipeline file",
            "The steps of a pipeline YAML file in order; a rerun skips finished steps and resumes an interrupted one",
            "account_tree", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        prop = inputs.str("file", required=True, label="Pipeline file",
                          description="A YAML file under $FAIRBALANCE_DATA_DIR/pipelines (or a folder of "
                                      "FAIRBALANCE_PIPELINE_DIRS) where the operation runs (the worker)")
        inputs.bool("dry_run", default=False, label="Dry run", description="Only show which steps would run")
        path = ctx.params.get("file")
        if path:
            try:
                pipeline = load_pipeline(pipeline_file(path))
            except Exception as e:  # the file's problem, with its line: shown on the form, before Execute
                prop.invalid, prop.error_message = True, str(e)
            else:
                n = len(pipeline.steps)
                inputs.view("plan", types.Notice(label=f"{n} step{'' if n == 1 else 's'} on dataset "
                                                       f"'{pipeline.dataset}': " +
                                                       ", ".join(s.command for s in pipeline.steps)))
        return types.Property(inputs, view=types.View(label="Run pipeline"))

    @streams_progress
    def execute(self, ctx):
        pipeline = load_pipeline(pipeline_file(ctx.params["file"]))  # never a path outside the allowed roots
        lines = []
        steps = len(pipeline.steps)

        def log(line):
            lines.append(line)
            ctx.set_progress(progress=min(1.0, sum(": finished" in x or "skipped" in x for x in lines) / steps),
                             label=line)

        result = run_pipeline(pipeline, dry_run=bool(ctx.params.get("dry_run", False)), log=log)
        return {"name": result.name, "ran": len(result.ran), "skipped": len(result.skipped),
                "log": as_text_block("\n".join(lines))}

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Pipeline",
            ("name", "str", "Pipeline run"),
            ("ran", "int", "Steps run"),
            ("skipped", "int", "Steps skipped (done before)"),
            ("log", "text", "Log"),
        )
