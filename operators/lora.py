"""Operators: one LoRA / DreamBooth adapter per group (or cluster), and group-balanced generation with them."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import finetune_per_group, generate_per_group

from ._common import streams_progress
from ._common import LIMITS, SHARD_OUTPUTS, queue_shards, refresh_app, runs, shards_input
from ._common import (categorical_fields, default_of, field_dropdown, given, operator_config, progress_callback,
                      readable_bytes, result_view, rounded, run_key_input, sampling_inputs)


class FinetunePerGroup(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "finetune_per_group", "fairbalance: fine-tune an adapter per group (LoRA / DreamBooth)",
            "One LoRA adapter per group, or per cluster of a group (Clustered DreamBooth), on a diffusion model",
            "tune", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        fields = categorical_fields(ctx.dataset)
        if not fields:
            inputs.view("no_fields", types.Error(label="No label field", description="The view needs group labels"))
            return types.Property(inputs)
        field_dropdown(inputs, "group_field", fields, "Group field", "The groups to fine-tune an adapter for",
                       default="ground_truth" if "ground_truth" in fields else fields[0])
        field_dropdown(inputs, "attribute_field", fields, "Second group field (optional)",
                       "Groups are then class x attribute cells, e.g. the class and the clusters", required=False)
        keys = runs.list_runs(ctx.dataset, "conditional_diffusion") if ctx.dataset is not None else []
        if keys:
            field_dropdown(inputs, "base_model_run", keys, "Base model: a trained conditional diffusion model",
                           "Or leave empty and give a Stable Diffusion folder / hub id below", required=False)
        inputs.str("base_model", required=not keys, label="Base model folder or hub id",
                   description="A Stable Diffusion pipeline (save_pretrained folder or hub id), or the folder of "
                               "a conditional diffusion model")
        method = types.RadioGroup()
        method.add_choice("lora", label="LoRA: each adapter under its group's condition / name")
        method.add_choice("dreambooth", label="DreamBooth: a rare token per adapter")
        inputs.enum("method", method.values(), default=default_of(finetune_per_group, "method"), view=method,
                    label="Method")
        inputs.int("clusters_per_group", default=default_of(finetune_per_group, "clusters_per_group"), min=1,
                   max=LIMITS["clusters_per_group"],
                   label="Clusters per group", description="> 1: Clustered DreamBooth, one adapter per cluster")
        for name, kind, label in (("rank", "int", "LoRA rank"), ("steps", "int", "Steps per adapter"),
                                  ("lr", "float", "Learning rate"), ("batch_size", "int", "Batch size"),
                                  ("min_images", "int", "Warn below this many images per group"),
                                  ("seed", "int", "Seed")):
            getattr(inputs, kind)(name, default=default_of(finetune_per_group, name), label=label,
                                  **({} if name == "seed" else {"min": 0}))
        inputs.str("prompt", default=default_of(finetune_per_group, "prompt"), required=False,
                   label="Prompt template (Stable Diffusion)", description="{token} and {group} are filled in")
        run_key_input(ctx, inputs, finetune_per_group, resumable=True)
        return types.Property(inputs, view=types.View(label="Fine-tune per group"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        group = [p["group_field"]] + ([p["attribute_field"]] if p.get("attribute_field") else [])
        res = finetune_per_group(
            ctx.target_view(), group_field=group if len(group) > 1 else group[0],
            progress=progress_callback(ctx, "Fine-tuning steps"),
            **given(p, ("base_model", "base_model_run", "method", "clusters_per_group", "rank", "steps", "lr",
                        "batch_size", "min_images", "seed", "prompt", "run_key", "overwrite")))
        out = res.to_dict()
        out["small_groups_text"] = ", ".join(f"{g}: {n}" for g, n in res.small_groups.items()) or "none"
        out.pop("adapters")
        out["adapter_size"] = f"{readable_bytes(res.adapter_bytes)} ({res.adapter_bytes / res.base_model_bytes:.1%} of " \
            f"the base UNet, {readable_bytes(res.base_model_bytes)})" if res.base_model_bytes else \
            readable_bytes(res.adapter_bytes)
        return rounded(out)

    def resolve_output(self, ctx):
        return result_view(
            "Adapters trained",
            ("num_adapters", "int", "Adapters"),
            ("num_trained", "int", "Trained now (the others were there)"),
            ("seconds_per_adapter", "float", "Seconds per adapter"),
            ("adapter_size", "str", "Size of an adapter"),
            ("small_groups_text", "str", "Groups with few images (trained anyway)"),
            ("output_dir", "str", "Adapter folder"),
        )


class GeneratePerGroup(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "generate_per_group", "fairbalance: generate per group with its adapter",
            "The same number of images per group (or fill up to the largest) from each group's adapters",
            "library_add", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        keys = runs.list_runs(ctx.dataset, "finetune_per_group") if ctx.dataset is not None else []
        if not keys:
            inputs.view("no_adapters", types.Error(label="No adapters", description="Fine-tune per group first"))
            return types.Property(inputs)
        field_dropdown(inputs, "finetune_run", keys, "Adapters", "A 'fine-tune per group' run", default=keys[-1])
        mode = types.RadioGroup()
        mode.add_choice("equal", label="The same number per group")
        mode.add_choice("fill", label="Fill every group up to the largest (or up to the number below)")
        inputs.enum("mode", mode.values(), default=default_of(generate_per_group, "mode"), view=mode, label="Mode")
        inputs.int("per_group", required=ctx.params.get("mode", "equal") == "equal", min=1, max=LIMITS["per_group"],
                   label="Images per group")
        groups = types.RadioGroup()
        groups.add_choice("observed", label="Groups with real images")
        groups.add_choice("all", label="Every class x attribute cell of the model (empty ones from the base model)")
        inputs.enum("groups", groups.values(), default=default_of(generate_per_group, "groups"), view=groups,
                    label="Groups")
        sampling_inputs(inputs, generate_per_group)
        shards_input(inputs, "the images")
        run_key_input(ctx, inputs, generate_per_group, resumable=True)
        return types.Property(inputs, view=types.View(label="Generate per group"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        names = ("mode", "per_group", "groups", "guidance_scale", "num_inference_steps", "seed", "run_key", "overwrite")
        queued = queue_shards(ctx, "generate_per_group", finetune_run=p["finetune_run"], **given(p, names))
        if queued:
            return queued
        res = generate_per_group(ctx.target_view(), finetune_run=p["finetune_run"],
                                 progress=progress_callback(ctx, "Generating"), **given(p, names))
        refresh_app(ctx)
        return rounded({**res.to_dict(), "added_per_group": ", ".join(
            f"{g}: {n}" for g, n in res.added.items() if n) or "nothing new (all images were there)"})

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Generated",
            *SHARD_OUTPUTS,
            ("num_added", "int", "Samples added"),
            ("added_per_group", "str", "Added per group"),
            ("entropy_before", "float", "Entropy of the groups, real samples (nats)"),
            ("entropy_after", "float", "Entropy of the groups, real + generated"),
            ("output_dir", "str", "Image folder"),
        )
