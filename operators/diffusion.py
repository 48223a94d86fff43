"""Operators: train the conditional diffusion model, generate balanced samples, filter them."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import filter_generated, generate_balanced, train_conditional_diffusion

from ._common import streams_progress
from ._common import LIMITS, SHARD_OUTPUTS, queue_shards, refresh_app, refuse, runs, shards_input
from ._common import (categorical_fields, default_of, field_dropdown, given, operator_config, progress_callback,
                      result_view, rounded, run_key_input, sampling_inputs)


def _cluster_field(ctx, inputs, preferred=None):
    fields = categorical_fields(ctx.dataset)
    if not fields:
        inputs.view("no_fields", types.Error(label="No label field", description="Compute pseudo-labels first"))
        return False
    default = preferred if preferred in fields else "sa_cluster" if "sa_cluster" in fields else fields[0]
    field_dropdown(inputs, "label_field", fields, "Cluster field", "The condition of the diffusion model",
                   default=default)
    return ctx.params.get("label_field") or default


def _refuse_single_cluster(ctx, inputs, field):
    """The library refuses a condition with one value (nothing to balance): say so before Execute."""
    values = [v for v in ctx.target_view().distinct(f"{field}.label") if v is not None]
    if len(values) < 2:
        refuse(inputs, "single_cluster", f"'{field}' has {len(values)} value(s) in this view: nothing to balance. "
                                         "Choose another field, or compute pseudo-labels with more clusters "
                                         "(k-means with a fixed number)")


#: Training steps below which a conditional model's images do not yet follow their condition: the README's
#: benchmark (Colored Digits, 16-32 px) gave 99.8% of images their cluster's colour after 640 steps, while
#: an earlier model drew noise-coloured shapes after a few hundred.
MIN_DIFFUSION_STEPS = 500


def steps_quality(steps):
    """One line judging a diffusion model's training length against ``MIN_DIFFUSION_STEPS``."""
    if steps is None:
        return None
    if steps < MIN_DIFFUSION_STEPS:
        return (f"Weak: {steps} training steps, below the ~{MIN_DIFFUSION_STEPS} a model needs before its images "
                f"follow their condition (640 steps gave 99.8% of images their cluster's colour in the README's "
                f"benchmark): expect noise; train more epochs (the run resumes)")
    return f"{steps} training steps: at least the ~{MIN_DIFFUSION_STEPS} after which images follow their condition"


def condition_quality(dataset, run_key, fields):
    """Lines saying how many of a generation run's images show the condition they were asked for, checked
    independently of the model (palette colours, read off the strokes); None where no check is available."""
    from fiftyone import ViewField as F

    from ._common import confirm_colors

    mine = dataset.match(F("generation.run_key") == run_key)
    lines = []
    for field in dict.fromkeys(f for f in fields if f):
        found = confirm_colors(mine, field) if dataset.get_field(field) is not None else None
        if found is None:
            continue
        ok, total = found
        share = round(100 * ok / total)
        line = (f"{ok} of {total} generated images ({share}%) show the colour they were asked for in '{field}' "
                f"(read off their strokes, independently of the model)")
        lines.append(line + (": weak, train the model longer or raise the guidance" if share < 80 else ""))
    return "\n".join(lines) or None


class TrainConditionalDiffusion(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "train_conditional_diffusion", "fairbalance: train conditional diffusion on clusters",
            "A class-conditional diffusion model with the pseudo-labels as conditions (resumable)",
            "auto_awesome", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        field = _cluster_field(ctx, inputs)
        if not field:
            return types.Property(inputs)
        _refuse_single_cluster(ctx, inputs, field)
        fields = categorical_fields(ctx.dataset)
        field_dropdown(inputs, "attribute_field", fields, "Attribute field (optional)",
                       "A second condition, e.g. the class as 'Cluster field' and the clusters here: the model "
                       "then generates any class x cluster cell ('cells' mode of generate balanced)", required=False)
        inputs.int("image_size", required=False, min=8, max=LIMITS["image_size"], label="Image size (px)",
                   description="Leave empty to train at the images' native size")
        for name, kind, label in (("epochs", "int", "Epochs"), ("batch_size", "int", "Batch size"),
                                  ("lr", "float", "Learning rate"),
                                  ("cond_drop_prob", "float", "Condition drop probability (CFG)"),
                                  ("seed", "int", "Seed")):
            getattr(inputs, kind)(name, default=default_of(train_conditional_diffusion, name), label=label,
                                  **({} if name in ("seed",) else {"min": 0}))
        run_key_input(ctx, inputs, train_conditional_diffusion, resumable=True)
        return types.Property(inputs, view=types.View(label="Train conditional diffusion"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        res = train_conditional_diffusion(
            ctx.target_view(), p["label_field"], progress=progress_callback(ctx, "Training steps"),
            **given(p, ("attribute_field", "image_size", "epochs", "batch_size", "lr", "cond_drop_prob", "seed",
                        "run_key", "overwrite")))
        return rounded({**res.to_dict(), "quality": steps_quality(res.steps)})

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Diffusion model trained",
            ("quality", "str", "Quality"),
            ("model_dir", "str", "Model folder"),
            ("steps", "int", "Training steps"),
            ("final_loss", "float", "Final loss"),
        )


class GenerateBalanced(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "generate_balanced", "fairbalance: generate balanced samples",
            "Generate the same number per cluster (or fill up to the largest) and add them",
            "library_add", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        keys = runs.list_runs(ctx.dataset, "conditional_diffusion")
        model_key = ctx.params.get("diffusion_run") or (keys[-1] if keys else None)
        trained = runs.get_run_config(ctx.dataset, model_key) if model_key in keys else {}
        if not _cluster_field(ctx, inputs, preferred=trained.get("label_field")):  # the model's field by default
            return types.Property(inputs)
        if not keys:
            inputs.view("no_model", types.Error(label="No diffusion model", description="Train one first"))
            return types.Property(inputs)
        field_dropdown(inputs, "diffusion_run", keys, "Diffusion model", "A 'train conditional diffusion' run",
                       default=keys[-1])
        chosen = ctx.params.get("label_field")
        if chosen and trained.get("label_field") and chosen != trained["label_field"]:
            refuse(inputs, "field_mismatch", f"The model '{model_key}' was trained on '{trained['label_field']}', "
                                             f"not '{chosen}': pick '{trained['label_field']}' as the cluster field, "
                                             f"or train a model on '{chosen}'")
        mode = types.RadioGroup()
        mode.add_choice("equal", label="Equal number per cluster (the paper's rule)")
        mode.add_choice("fill", label="Fill every cluster up to the largest")
        if trained.get("attribute_field"):  # cells need a class x attribute model
            mode.add_choice("cells", label="Fill every class x attribute cell (a model trained with an attribute)")
        inputs.enum("mode", mode.values(), default=default_of(generate_balanced, "mode"), view=mode, label="Mode")
        if ctx.params.get("mode") == "cells" and trained.get("attribute_field"):
            inputs.int("per_cell", default=40, min=1, max=LIMITS["per_cell"],
                       label="Images per cell (real + generated)")
            source = types.RadioGroup()
            source.add_choice("edit", label="Edit real images of the class (keeps their shape)")
            source.add_choice("noise", label="From pure noise")
            inputs.enum("source", source.values(), default="edit", view=source, label="Start from")
            inputs.float("edit_strength", default=default_of(generate_balanced, "edit_strength"), min=0.05, max=1.0,
                         label="Edit strength",
                         description="How far real images are noised before denoising under the new condition")
            inputs.float("attribute_guidance_scale", required=False, min=0, label="Attribute guidance",
                         description="Guidance toward the attribute (default: the guidance scale)")
        else:
            prop = inputs.int("total", default=2000, min=1, max=LIMITS["total"], label="Total images (equal mode)",
                              description="Split equally over the clusters (the paper generates 2,000)")
            run = ctx.params.get("diffusion_run") if ctx.params.get("diffusion_run") in keys else keys[-1]
            num_clusters = len(runs.get_run_config(ctx.dataset, run).get("classes") or [])
            total = ctx.params.get("total")
            if (ctx.params.get("mode") or default_of(generate_balanced, "mode")) == "equal" and total is not None \
                    and total < num_clusters:
                prop.invalid = True
                prop.error_message = f"At least one image per cluster: the model has {num_clusters} clusters"
        sampling_inputs(inputs, generate_balanced)
        shards_input(inputs, "the images")
        run_key_input(ctx, inputs, generate_balanced, resumable=True)
        return types.Property(inputs, view=types.View(label="Generate balanced samples"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        mode = p.get("mode") or default_of(generate_balanced, "mode")
        names = ("mode", "guidance_scale", "num_inference_steps", "seed", "run_key", "overwrite") + (
            ("per_cell", "source", "edit_strength", "attribute_guidance_scale") if mode == "cells" else
            ("total",) if mode == "equal" else ())
        queued = queue_shards(ctx, "generate_balanced", label_field=p["label_field"], model_run=p["diffusion_run"],
                              **given(p, names))
        if queued:
            return queued
        res = generate_balanced(ctx.target_view(), p["label_field"], model_run=p["diffusion_run"],
                                progress=progress_callback(ctx, "Generating"), **given(p, names))
        refresh_app(ctx)
        model_steps = runs.load_run_results(ctx.dataset, p["diffusion_run"]).get("steps")
        trained = runs.get_run_config(ctx.dataset, p["diffusion_run"])
        quality = [steps_quality(model_steps) if model_steps is not None and model_steps < MIN_DIFFUSION_STEPS
                   else None,
                   condition_quality(ctx.dataset, res.run_key, (p["label_field"], trained.get("attribute_field")))]
        return rounded({**res.to_dict(), "added_per_cluster": ", ".join(
            f"{c}: {n}" for c, n in res.added.items() if n) or "nothing new (all images were there)",
            "quality": "\n".join(q for q in quality if q) or None})

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Generated",
            ("quality", "str", "Quality"),
            *SHARD_OUTPUTS,
            ("num_added", "int", "Samples added"),
            ("added_per_cluster", "str", "Added per cluster"),
            ("entropy_before", "float", "Entropy of the groups, real samples (nats)"),
            ("entropy_after", "float", "Entropy of the groups, real + generated"),
            ("two_sample_accuracy", "float", "Real-vs-generated accuracy (0.5 = indistinguishable)"),
            ("realism_warning", "str", "Realism"),
            ("output_dir", "str", "Image folder"),
        )


def parse_cluster_texts(text):
    """``"cluster: text"`` lines -> ``{cluster: text}``; None when empty."""
    from fairbalance import FairBalanceError

    out = {}
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        cluster, sep, value = line.partition(":")
        if not sep or not cluster.strip() or not value.strip():
            raise FairBalanceError(f"Cluster texts: expected 'cluster: text', got {line!r}")
        out[cluster.strip()] = value.strip()
    return out or None


class FilterGenerated(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "filter_generated", "fairbalance: filter generated samples",
            "Score generated images by CLIP similarity to their cluster and tag the worst",
            "filter_alt", delegated="default",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        if not _cluster_field(ctx, inputs):
            return types.Property(inputs)
        inputs.str("embeddings_field", default=default_of(filter_generated, "embeddings_field"), required=False,
                   label="Embeddings field")
        inputs.float("bottom_fraction", default=default_of(filter_generated, "bottom_fraction"), min=0, max=1,
                     label="Tag the bottom fraction")
        inputs.str("tag", default=default_of(filter_generated, "tag"), required=False, label="Tag")
        inputs.str("within", required=False, label="Cut within each group of (optional)",
                   description="A field of the generated samples, e.g. generation.cell: the bottom fraction is "
                               "cut within each of its values, so no cell is emptied (oversample, then keep "
                               "the most realistic)")
        action = types.RadioGroup()
        action.add_choice("tag", label="Tag them only")
        action.add_choice("exclude", label="Tag them and leave them out of training (synthetic, two-stage)")
        action.add_choice("weight", label="Tag them and weight every generated sample by its score in training")
        inputs.enum("action", action.values(), default=default_of(filter_generated, "action"), view=action,
                    label="Action")
        score = types.RadioGroup()
        score.add_choice("clip", label="CLIP similarity (needs the embeddings of the SA features)")
        score.add_choice("pixels", label="Pixel similarity (no CLIP weights needed; much weaker)")
        score.add_choice("discriminator", label="Realism: a real-vs-generated discriminator (no labels; "
                                                "weights = density ratio p(real)/p(generated))")
        inputs.enum("method", score.values(), default=default_of(filter_generated, "method"), view=score,
                    label="Score")
        inputs.str("texts", required=False, label="Cluster texts (optional)", view=types.TextFieldView(
            multiline=True, placeholder="0: a photo of an old man\n1: a photo of a young woman"),
            description="One 'cluster: text' per line to score against texts instead of cluster centroids")
        run_key_input(ctx, inputs, filter_generated)
        _filter_generated_problems(ctx, inputs)
        return types.Property(inputs, view=types.View(label="Filter generated samples"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        res = filter_generated(
            ctx.target_view(), p["label_field"], texts=parse_cluster_texts(p.get("texts")),
            progress=progress_callback(ctx, "Scoring"),
            **given(p, ("embeddings_field", "bottom_fraction", "tag", "action", "method", "within", "run_key",
                        "overwrite")))
        refresh_app(ctx)
        return rounded({**res.to_dict(), "tagged_of": f"{res.num_tagged} of the {res.num_scored} generated samples "
                                                      "scored"})

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Filtered",
            ("num_scored", "int", "Generated samples scored"),
            ("tagged_of", "str", "Tagged"),
            ("tag", "str", "With the tag"),
            ("num_excluded", "int", "Left out of training"),
            ("weight_field", "str", "Weights for training (weight_field)"),
            ("mean_score", "float", "Mean score (similarity to the cluster, or p(real))"),
            ("two_sample_accuracy", "float", "Real-vs-generated accuracy (0.5 = indistinguishable)"),
        )



def _filter_generated_problems(ctx, inputs):
    """What filter_generated would refuse, said before Execute: a view without generated or real samples, or
    CLIP scores without the embeddings field."""
    from fiftyone import ViewField as F

    view = ctx.target_view()
    if not len(view.match(F("generated") == True).limit(1)):  # noqa: E712
        refuse(inputs, "no_generated", "The view has no generated samples: generate some first, or pick a view "
                                       "(or clear the sidebar filter) that includes the samples tagged 'generated'")
    elif not len(view.match(F("generated") != True).limit(1)) and not (ctx.params.get("texts") or "").strip():  # noqa: E712
        refuse(inputs, "no_real", "The view has only generated samples: they are scored against the real samples "
                                  "of their cluster, so pick a view with real samples too, or give cluster texts")
    within = (ctx.params.get("within") or "").strip()
    if within and within not in view.get_field_schema(flat=True):  # the library's rule (require_fields)
        refuse(inputs, "no_within", f"No field '{within}' on this dataset to cut within: name a field of the "
                                    "generated samples (e.g. generation.cell), or leave it empty")
    method = ctx.params.get("method") or default_of(filter_generated, "method")
    field = ctx.params.get("embeddings_field") or default_of(filter_generated, "embeddings_field")
    if method == "clip" and ctx.dataset.get_field(field) is None:
        refuse(inputs, "no_embeddings", f"No field '{field}' on this dataset: compute SA features first (they "
                                        "store the CLIP embeddings), name the field that holds them, or score by "
                                        "pixels")
