"""Operators: caption samples, filter captions, generate images from captions (DiffuBias)."""

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance.captions import compute_captions, filter_captions
from fairbalance.text_to_image import generate_from_captions

from ._common import categorical_fields, field_dropdown, operator_config, progress_callback, result_view, run_key_input


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
        inputs.str("model", default="Salesforce/blip-image-captioning-base", required=False,
                   label="Captioning model", description="Hugging Face hub id or a local save_pretrained folder")
        inputs.int("num_captions", default=3, min=1, label="Captions per image")
        inputs.str("caption_field", default="captions", required=False, label="Caption field")
        inputs.int("batch_size", default=16, min=1, label="Batch size")
        inputs.int("seed", default=0, label="Seed")
        run_key_input(inputs, "captions")
        return types.Property(inputs, view=types.View(label="Caption samples"))

    def execute(self, ctx):
        p = ctx.params
        res = compute_captions(
            ctx.target_view(), model=p.get("model") or "Salesforce/blip-image-captioning-base",
            num_captions=int(p.get("num_captions", 3)), caption_field=p.get("caption_field") or "captions",
            batch_size=int(p.get("batch_size", 16)), seed=int(p.get("seed", 0)),
            run_key=p.get("run_key") or "captions", overwrite=bool(p.get("overwrite", False)),
            progress=progress_callback(ctx, "Captioning"),
        )
        ctx.ops.reload_dataset()
        return res


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
        inputs.int("top_f", required=False, min=1, label="Top-F words (overrides the label field)")
        inputs.str("output_field", default="filtered_captions", required=False, label="Output field")
        run_key_input(inputs, "caption_filter")
        return types.Property(inputs, view=types.View(label="Filter captions"))

    def execute(self, ctx):
        p = ctx.params
        res = filter_captions(
            ctx.target_view(), p["caption_field"], output_field=p.get("output_field") or "filtered_captions",
            label_field=p.get("label_field") or None, top_f=int(p["top_f"]) if p.get("top_f") else None,
            run_key=p.get("run_key") or "caption_filter", overwrite=bool(p.get("overwrite", False)),
        )
        ctx.ops.reload_dataset()
        return {**res.to_dict(), "top_words_text": ", ".join(res.top_words),
                "dropped_text": "\n".join(res.dropped_examples)}

    def resolve_output(self, ctx):
        return result_view(
            "Captions filtered",
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
        inputs.str("model", default="runwayml/stable-diffusion-v1-5", required=False, label="Diffusion pipeline")
        inputs.int("images_per_caption", default=1, min=1, label="Images per caption")
        inputs.float("guidance_scale", default=7.5, min=0, label="Guidance scale")
        inputs.int("num_inference_steps", default=30, min=1, label="Steps")
        inputs.int("seed", default=0, label="Seed")
        inputs.bool("safety_checker", default=True, label="Keep the pipeline's safety checker")
        return types.Property(inputs, view=types.View(label="Generate from captions"))

    def execute(self, ctx):
        p = ctx.params
        res = generate_from_captions(
            ctx.target_view(), p["caption_field"], model=p.get("model") or "runwayml/stable-diffusion-v1-5",
            label_field=p.get("label_field") or None, images_per_caption=int(p.get("images_per_caption", 1)),
            guidance_scale=float(p.get("guidance_scale", 7.5)),
            num_inference_steps=int(p.get("num_inference_steps", 30)),
            seed=int(p.get("seed", 0)), safety_checker=bool(p.get("safety_checker", True)),
            progress=progress_callback(ctx, "Generating"),
        )
        ctx.ops.reload_dataset()
        return res
