"""Operators: caption samples, filter captions, generate images from captions (DiffuBias)."""

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import compute_captions, filter_captions, generate_from_captions

from ._common import streams_progress
from ._common import LIMITS, SHARD_OUTPUTS, queue_shards, refresh_app, shards_input
from ._common import (as_text_block, categorical_fields, default_of, field_dropdown, given, operator_config,
                      progress_callback, result_view, run_key_input, sampling_inputs)


def _list_fields(dataset):
    if dataset is None:
        return []
    return [n for n, f in dataset.get_field_schema().items()
            if isinstance(f, fo.ListField) and isinstance(f.field, fo.StringField)]


class ComputeCaptions(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "compute_captions", "fairbalance: caption samples",
            "Several diverse captions per image from an image-to-text model (BLIP, GIT, ...)",
            "subtitles", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        inputs.str("model", default=default_of(compute_captions, "model"), required=False,
                   label="Captioning model", description="Hugging Face hub id or a local save_pretrained folder")
        inputs.int("num_captions", default=default_of(compute_captions, "num_captions"), min=1,
                   max=LIMITS["num_captions"], label="Captions per image")
        inputs.str("caption_field", default=default_of(compute_captions, "caption_field"), required=False,
                   label="Caption field")
        inputs.int("batch_size", default=default_of(compute_captions, "batch_size"), min=1, max=LIMITS["batch_size"],
                   label="Batch size")
        inputs.int("seed", default=default_of(compute_captions, "seed"), max=LIMITS["seed"], label="Seed")
        shards_input(inputs)
        run_key_input(ctx, inputs, compute_captions)
        return types.Property(inputs, view=types.View(label="Caption samples"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        kwargs = given(p, ("model", "num_captions", "caption_field", "batch_size", "seed", "run_key", "overwrite"))
        queued = queue_shards(ctx, "compute_captions", **kwargs)
        if queued:
            return queued
        res = compute_captions(ctx.target_view(), progress=progress_callback(ctx, "Captioning"), **kwargs)
        refresh_app(ctx)
        return res.to_dict()

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Captions written",
            *SHARD_OUTPUTS,
            ("caption_field", "str", "Caption field"),
            ("num_samples", "int", "Samples captioned"),
            ("num_captions", "int", "Captions per sample"),
            ("num_empty", "int", "Samples with only empty captions"),
        )


class FilterCaptions(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "filter_captions", "fairbalance: filter captions",
            "Keep captions containing one of the top-F frequent non-stopword words",
            "filter_list", delegated=None,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        fields = _list_fields(ctx.dataset)
        if not fields:
            inputs.view("none", types.Error(label="No caption field", description="Caption samples first"))
            return types.Property(inputs)
        field_dropdown(inputs, "caption_field", fields, "Caption field", "Lists of captions",
                       default="captions" if "captions" in fields else fields[0])
        labels = categorical_fields(ctx.dataset)
        field_dropdown(inputs, "label_field", labels, "Label field (F = 2 x its classes)", "", required=False,
                       default="ground_truth" if "ground_truth" in labels else None)
        inputs.int("top_f", required=False, min=1, max=LIMITS["top_f"], label="Top-F words (overrides the label field)")
        inputs.str("output_field", default=default_of(filter_captions, "output_field"), required=False,
                   label="Output field")
        run_key_input(ctx, inputs, filter_captions)
        return types.Property(inputs, view=types.View(label="Filter captions"))

    def execute(self, ctx):
        p = ctx.params
        res = filter_captions(
            ctx.target_view(), p["caption_field"], label_field=p.get("label_field") or None,
            **given(p, ("output_field", "top_f", "run_key", "overwrite")),
        )
        refresh_app(ctx)
        return {**res.to_dict(), "top_words_text": ", ".join(res.top_words),
                "dropped_text": as_text_block("\n".join(res.dropped_examples)) if res.dropped_examples else None}

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Captions filtered",
            ("top_words_text", "str", "Top-F words"),
            ("num_kept", "int", "Captions kept"),
            ("num_dropped", "int", "Captions dropped"),
            ("dropped_text", "text", "Some dropped captions"),
        )


class GenerateFromCaptions(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "generate_from_captions", "fairbalance: generate images from captions",
            "Text-to-image (Stable Diffusion family) from each sample's captions; label copied",
            "image", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        fields = _list_fields(ctx.dataset)
        if not fields:
            inputs.view("none", types.Error(label="No caption field", description="Caption samples first"))
            return types.Property(inputs)
        field_dropdown(inputs, "caption_field", fields, "Caption field", "",
                       default="filtered_captions" if "filtered_captions" in fields else fields[0])
        labels = categorical_fields(ctx.dataset)
        field_dropdown(inputs, "label_field", labels, "Label to copy", "", required=False,
                       default="ground_truth" if "ground_truth" in labels else None)
        inputs.str("model", default=default_of(generate_from_captions, "model"), required=False,
                   label="Diffusion pipeline")
        inputs.int("images_per_caption", default=default_of(generate_from_captions, "images_per_caption"), min=1,
                   max=LIMITS["images_per_caption"], label="Images per caption")
        sampling_inputs(inputs, generate_from_captions)
        inputs.bool("safety_checker", default=default_of(generate_from_captions, "safety_checker"),
                    label="Keep the pipeline's safety checker")
        shards_input(inputs, "the images")
        run_key_input(ctx, inputs, generate_from_captions, resumable=True)
        return types.Property(inputs, view=types.View(label="Generate from captions"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        names = ("model", "images_per_caption", "guidance_scale", "num_inference_steps", "seed", "safety_checker",
                 "run_key", "overwrite")
        queued = queue_shards(ctx, "generate_from_captions", caption_field=p["caption_field"],
                              label_field=p.get("label_field") or None, **given(p, names))
        if queued:
            return queued
        res = generate_from_captions(
            ctx.target_view(), p["caption_field"], label_field=p.get("label_field") or None,
            progress=progress_callback(ctx, "Generating"), **given(p, names),
        )
        refresh_app(ctx)
        return res.to_dict()

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Generated",
            *SHARD_OUTPUTS,
            ("num_added", "int", "Samples added"),
            ("output_dir", "str", "Image folder"),
            ("target_dataset", "str", "Added to dataset"),
        )
