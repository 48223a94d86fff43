"""Operator: discover under-performing slices nobody named, with names, ranked by error gap."""

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import discover_slices

from ._common import streams_progress
from ._common import LIMITS, SHARD_OUTPUTS, queue_shards, refresh_app, classifier_and_shards_input
from ._common import (categorical_fields, default_of, field_dropdown, given, operator_config, output_field_input,
                      refuse, result_view, rounded, run_key_input)

SOURCE_LABELS = {"model": "The model's penultimate layer (or the features field)",
                 "early": "The model's first hidden layer", "pixels": "Image statistics (no model)"}


def _default(name):
    return default_of(discover_slices, name)


def _fields_of(dataset, types_):
    if dataset is None:
        return []
    return [n for n, f in dataset.get_field_schema().items() if isinstance(f, types_)]


def _sources_input(ctx, inputs):
    """What the slices are clustered on: a multi-select of the library's feature sources, its default pre-set;
    an empty or unknown choice is refused before Execute, as the library would refuse it."""
    sources = types.DropdownView(multiple=True, label="Feature sources",
                                 description="Joined with equal weight; the early layer and image statistics find "
                                             "slices (blur, noise, thickness) the penultimate layer misses")
    for name, label in SOURCE_LABELS.items():
        sources.add_choice(name, label=label)
    inputs.list("feature_sources", types.String(), min_items=1, default=list(_default("feature_sources")),
                view=sources, label="Feature sources")
    chosen = ctx.params.get("feature_sources")
    if chosen is not None and not chosen:
        refuse(inputs, "no_sources", "Pick at least one feature source")
    elif chosen is not None and (not set(chosen) <= set(SOURCE_LABELS) or len(set(chosen)) != len(chosen)):
        refuse(inputs, "bad_sources", f"Feature sources are distinct values of {', '.join(SOURCE_LABELS)}")
    elif chosen is not None and ctx.params.get("features_field") and "model" not in chosen:
        refuse(inputs, "features_unused", "The features field stands for the model's penultimate layer: add that "
                                          "source, or leave the features field empty")


class DiscoverSlices(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "discover_slices", "fairbalance: discover slices",
            "Find slices of each class a biased model fails on, from its own features, and name them",
            "travel_explore",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        labels = categorical_fields(ctx.dataset)
        if not labels:
            inputs.view("no_fields", types.Error(label="No label field", description="The view needs class labels"))
            return types.Property(inputs)
        field_dropdown(inputs, "label_field", labels, "Label field", "Class labels",
                       default="ground_truth" if "ground_truth" in labels else labels[0])
        method = types.RadioGroup()
        method.add_choice("error_aware", label="Error-aware (features + the model's errors, per class)")
        method.add_choice("george", label="GEORGE (features alone, per class)")
        inputs.enum("method", method.values(), default=_default("method"), view=method, label="Method")
        inputs.int("slices_per_class", default=_default("slices_per_class"), min=1, max=LIMITS["num_clusters"],
                   label="Slices per class")
        _sources_input(ctx, inputs)
        vectors = _fields_of(ctx.dataset, (fo.VectorField, fo.ListField))
        if vectors:
            field_dropdown(inputs, "features_field", vectors, "Features (optional)",
                           "A vector field (e.g. CLIP embeddings); empty: the classifier's penultimate layer",
                           required=False)
        texts = _fields_of(ctx.dataset, (fo.ListField, fo.StringField))
        if texts:
            field_dropdown(inputs, "captions_field", texts, "Captions (optional)",
                           "Caption keywords over-represented in a slice name it (B2T)", required=False)
        naming = [f for f in labels if f != ctx.params.get("label_field")]
        if naming:
            exclude = types.DropdownView(multiple=True, label="Fields that may not name slices (optional)",
                                         description="Ground-truth or evaluation fields (e.g. bias_aligned): every "
                                                     "other categorical field over-represented in a slice names it")
            for name in naming:
                exclude.add_choice(name, label=name)
            inputs.list("exclude_name_fields", types.String(), required=False, view=exclude,
                        label="Fields that may not name slices (optional)")
        if not classifier_and_shards_input(
                ctx, inputs, "Trained classifier (optional)",
                "The folder of a trained classifier; empty: a GCE-biased one is trained here. Needed with Shards > 1",
                "the model's outputs", "clusters, names and records the slices"):
            inputs.int("epochs", default=_default("epochs"), min=1, max=LIMITS["epochs"], label="Epochs")
        inputs.int("seed", default=_default("seed"), max=LIMITS["seed"], label="Seed")
        output_field_input(ctx, inputs, "slice_field", discover_slices, "Slice field to write")
        run_key_input(ctx, inputs, discover_slices)
        return types.Property(inputs, view=types.View(label="Discover slices"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        classifier = (p.get("classifier") or "").strip() or None
        names = ("method", "slices_per_class", "features_field", "captions_field", "seed", "slice_field", "run_key",
                 "overwrite", "feature_sources", "exclude_name_fields") + (() if classifier else ("epochs",))
        kwargs = dict(label_field=p["label_field"], classifier=classifier, **given(p, names))
        queued = queue_shards(ctx, "discover_slices", **kwargs)
        if queued:
            return queued
        result = discover_slices(ctx.target_view(), **kwargs)
        refresh_app(ctx)
        out = result.to_dict()
        out["table"] = [{"slice": r["slice"], "name": r["name"] or "", "size": r["size"],
                         "error_rate": round(r["error_rate"], 3), "error_gap": round(r["error_gap"], 3)}
                        for r in result.slices]
        return rounded(out)

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Slices discovered",
            *SHARD_OUTPUTS,
            ("num_slices", "int", "Slices"),
            ("slice_field", "str", "Slice field (use it as an attribute: cells, per-group, the gate)"),
            ("table", "table", "Slices ranked by error gap",
             {"slice": "Slice", "name": "Name", "size": "Samples", "error_rate": "Error rate",
              "error_gap": "Gap to its class"}),
        )
