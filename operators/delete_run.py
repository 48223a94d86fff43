"""Operator: delete a run of this plugin and what it wrote, listed in the form before Execute."""

import os

import fiftyone.operators as foo
import fiftyone.operators.types as types


from ._common import delete_generated, field_dropdown, operator_config, refresh_app, refuse, result_view, runs


def _newest_first(dataset):
    """fairbalance's runs on the dataset, the newest first."""
    return runs.list_runs(dataset)[::-1]


def removal_plan(dataset, run_key):
    """What deleting ``run_key`` removes: its fields, its tags, its generated samples (and their images)."""
    from fiftyone import ViewField as F

    config = runs.get_run_config(dataset, run_key)
    method = config.get("method", "")[len(runs.CONFIG_PREFIX):]
    schema = dataset.get_field_schema()
    fields = [f for f in config.get("fields_written", []) if f in schema]
    tagged = runs.load_run_results(dataset, run_key).get("tagged_ids") if config.get("tag") else None
    generated = len(dataset.match(F("generation.run_key") == run_key)) if "generation" in schema else 0
    kept = [config[k] for k in ("model_dir", "output_dir") if isinstance(config.get(k), str)
            and os.path.exists(config[k]) and not generated]
    return {"run_key": run_key, "method": method, "fields": fields,
            "tag": config.get("tag") if tagged else None, "num_untagged": len(tagged or []),
            "num_generated": generated, "kept_on_disk": kept}


def _plan_markdown(plan):
    lines = [f"Deleting run **{plan['run_key']}** ({plan['method']}) removes:", "", "- its record on the dataset"]
    for f in plan["fields"]:
        lines.append(f"- the field **{f}** of every sample")
    if plan["tag"]:
        lines.append(f"- the tag **{plan['tag']}** from the {plan['num_untagged']} samples it tagged")
    if plan["num_generated"]:
        lines.append(f"- the **{plan['num_generated']} generated samples** it added, and their image files")
    for path in plan["kept_on_disk"]:
        lines.append(f"\nKept: the files in `{path}` (delete the folder yourself if no longer needed)")
    return "\n".join(lines)


class DeleteRun(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "delete_run", "fairbalance: delete a run",
            "Delete a run of this plugin with the fields, tags and generated samples it wrote",
            "delete", delegated=None,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        keys = _newest_first(ctx.dataset)
        if not keys:
            refuse(inputs, "no_runs", "This dataset has no fairbalance runs to delete")
            return types.Property(inputs, view=types.View(label="Delete a run"))
        field_dropdown(inputs, "run_key", keys, "Run", "A run of this plugin (newest first)", default=keys[0])
        key = ctx.params.get("run_key") or keys[0]
        if key in keys:
            inputs.md(_plan_markdown(removal_plan(ctx.dataset, key)), name="plan")
        return types.Property(inputs, view=types.View(label="Delete a run"))

    def execute(self, ctx):
        key = ctx.params["run_key"]
        plan = removal_plan(ctx.dataset, key)
        if plan["num_generated"]:
            delete_generated(ctx.dataset, key)
        runs.delete_run(ctx.dataset, key, cleanup=True)
        refresh_app(ctx)
        return {"run_key": key, "fields_deleted": ", ".join(plan["fields"]) or "none",
                "samples_untagged": plan["num_untagged"], "generated_deleted": plan["num_generated"]}

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Run deleted",
            ("run_key", "str", "Run"),
            ("fields_deleted", "str", "Fields deleted"),
            ("samples_untagged", "int", "Samples untagged"),
            ("generated_deleted", "int", "Generated samples deleted"),
        )
