"""Operator: one shard (or the merge) of a sharded run, as queued by ``fairbalance.queue_sharded``."""

import fiftyone.operators as foo
import fiftyone.operators.types as types


from ._common import streams_progress
from ._common import LIMITS, progress_callback, result_view, sharding


class ComputeShard(foo.Operator):
    @property
    def config(self):
        cfg = foo.OperatorConfig(
            name="compute_shard", label="fairbalance: one shard of a sharded run",
            description="Runs shard i of n of a sharded fairbalance run (queued by queue_sharded or a form's "
                        "Shards option); the last shard to finish records the run",
            icon="view_module", dynamic=False, unlisted=True, execute_as_generator=True,
            allow_immediate_execution=True, allow_delegated_execution=True, default_choice_to_delegated=True,
        )
        return cfg

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.str("function", required=True, label="Function")
        inputs.str("run_key", required=True, label="Run key")
        inputs.int("num_shards", required=True, max=LIMITS["num_shards"], label="Shards")
        inputs.int("shard", required=False, label="Shard")
        inputs.bool("merge", default=False, label="Merge only")
        inputs.obj("kwargs", label="Arguments")
        inputs.str("job_token", required=False, label="Job token")
        return types.Property(inputs)

    def resolve_run_name(self, ctx):
        p = ctx.params
        what = "merge" if p.get("merge") else f"shard {p.get('shard')}/{p.get('num_shards')}"
        return f"{p.get('function')} '{p.get('run_key')}' {what}"

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        if not sharding.current_operation(ctx.target_view(), p["run_key"], p.get("job_token")):
            return {"run_key": p["run_key"], "skipped": "its job was replaced or deleted after it was queued"}
        if p.get("merge"):
            results = sharding.merge(ctx.target_view(), p["run_key"])
            return {"run_key": p["run_key"], "merged": results is not None}
        fn = sharding.shardable(p["function"]).load()
        result = fn(ctx.target_view(), shard=int(p["shard"]), num_shards=int(p["num_shards"]),
                    run_key=p["run_key"], progress=progress_callback(ctx, f"Shard {p['shard']}/{p['num_shards']}"),
                    **(p.get("kwargs") or {}))
        out = result.to_dict()
        out.pop("results", None)
        out["num_failures"] = len(out.pop("failures", {}))
        return out

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Shard done",
            ("skipped", "str", "Not run"),
            ("shard", "int", "Shard"),
            ("num_samples", "int", "Samples in this shard"),
            ("num_processed", "int", "Processed now"),
            ("num_resumed", "int", "Done before (skipped)"),
            ("num_failures", "int", "Images that could not be loaded"),
        )
