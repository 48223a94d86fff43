"""Operator: DiffInject, bias-conflicting samples by h-space content injection."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import inject_bias_conflicting

from ._common import streams_progress
from ._common import LIMITS, SHARD_OUTPUTS, queue_shards, refresh_app, runs, shards_input
from ._common import (categorical_fields, default_of, field_dropdown, given, operator_config, progress_callback,
                      result_view, rounded, run_key_input)

PARAMS = ("content_tag", "ratio", "gamma", "injection", "t_edit", "t_boost", "num_inference_steps", "label_from",
          "seed", "run_key", "overwrite")


class InjectBiasConflicting(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "inject_bias_conflicting", "fairbalance: inject bias-conflicting content (DiffInject)",
            "Regenerate random bias-aligned images with the h-space content of the tagged bias-conflicting ones",
            "call_merge", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        fields = categorical_fields(ctx.dataset)
        if not fields:
            inputs.view("no_fields", types.Error(label="No label field", description="The view needs class labels"))
            return types.Property(inputs)
        keys = runs.list_runs(ctx.dataset, "conditional_diffusion")
        if not keys:
            inputs.view("no_model", types.Error(label="No diffusion model",
                                                description="Train one first (train conditional diffusion)"))
            return types.Property(inputs)
        field_dropdown(inputs, "diffusion_run", keys, "Diffusion model",
                       "A 'train conditional diffusion' run (used without its condition)", default=keys[-1])
        default = "ground_truth" if "ground_truth" in fields else fields[0]
        field_dropdown(inputs, "label_field", fields, "Label field", "The class label the injected images carry",
                       default=default)
        inputs.str("content_tag", default=default_of(inject_bias_conflicting, "content_tag"), required=False,
                   label="Content tag", description="The tag of the bias-conflicting samples (compute hardness tags)")
        inputs.float("ratio", default=default_of(inject_bias_conflicting, "ratio"), min=0, max=LIMITS["ratio"],
                     label="Bias-conflict ratio",
                     description="Images to make, as a fraction of the real labelled samples (paper: 0.1)")
        inputs.float("gamma", default=default_of(inject_bias_conflicting, "gamma"), min=0, max=1,
                     label="Injection ratio (gamma)", description="0 = the original's reconstruction, 1 = all content")
        kind = types.RadioGroup()
        kind.add_choice("local", label="Local: inside the central box of the bottleneck")
        kind.add_choice("global", label="Global: the whole bottleneck")
        inputs.enum("injection", kind.values(), default=default_of(inject_bias_conflicting, "injection"), view=kind,
                    label="Injection")
        inputs.int("t_edit", default=default_of(inject_bias_conflicting, "t_edit"), min=1, max=LIMITS["t_edit"],
                   label="t_edit",
                   description="Inject over the timesteps [T, t_edit] (of T = 1000)")
        inputs.int("t_boost", default=default_of(inject_bias_conflicting, "t_boost"), min=0, max=LIMITS["t_boost"],
                   label="t_boost",
                   description="Add noise over [t_boost, 0] (quality boosting)")
        inputs.int("num_inference_steps", default=default_of(inject_bias_conflicting, "num_inference_steps"), min=1,
                   max=LIMITS["num_inference_steps"], label="DDIM steps")
        source = types.RadioGroup()
        source.add_choice("content", label="The content's (the tagged sample)")
        source.add_choice("original", label="The original's")
        inputs.enum("label_from", source.values(), default=default_of(inject_bias_conflicting, "label_from"),
                    view=source, label="Label of the injected image")
        inputs.int("seed", default=default_of(inject_bias_conflicting, "seed"), max=LIMITS["seed"], label="Seed",
                   description="The pairs and every image's noise derive from it")
        shards_input(inputs, "the images")
        run_key_input(ctx, inputs, inject_bias_conflicting, resumable=True)
        return types.Property(inputs, view=types.View(label="DiffInject"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        queued = queue_shards(ctx, "inject_bias_conflicting", model_run=p["diffusion_run"],
                              label_field=p.get("label_field") or "ground_truth", **given(p, PARAMS))
        if queued:
            return queued
        res = inject_bias_conflicting(ctx.target_view(), model_run=p["diffusion_run"],
                                      label_field=p.get("label_field") or "ground_truth",
                                      progress=progress_callback(ctx, "Injecting"), **given(p, PARAMS))
        refresh_app(ctx)
        return rounded({**res.to_dict(), "added_per_label": ", ".join(
            f"{c}: {n}" for c, n in res.added.items() if n) or "nothing new (all images were there)"})

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Injected",
            *SHARD_OUTPUTS,
            ("num_added", "int", "Samples added"),
            ("added_per_label", "str", "Added per label"),
            ("num_contents", "int", "Content (tagged) samples"),
            ("num_originals", "int", "Original (untagged) samples"),
            ("output_dir", "str", "Image folder"),
        )
