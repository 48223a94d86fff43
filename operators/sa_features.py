"""Operator: sensitive-attribute features from a text-specified attribute."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import compute_sa_features

from ._common import streams_progress
from ._common import LIMITS, SHARD_OUTPUTS, clip_check, queue_shards, shards_input
from ._common import output_field_input, refresh_app
from ._common import (attribute_or_texts_input, default_of, given, operator_config, progress_callback,
                      related_texts_columns, result_view, rounded, run_key_input, split_list, text_source)


def _default(name):
    return default_of(compute_sa_features, name)


class ComputeSAFeatures(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "compute_sa_features", "fairbalance: compute sensitive-attribute features",
            "CLIP similarities of every image to the WordNet texts closest to an attribute you type",
            "text_fields",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        if attribute_or_texts_input(ctx, inputs, 'What the data may be imbalanced in, e.g. "races" or '
                                                 '"age groups"') == "wordnet":
            inputs.str("attribute_values", required=False, label="Attribute values (optional, comma-separated)",
                       description='e.g. "white person, black person"')
            inputs.int("num_related_texts", default=_default("num_related_texts"), min=2,
                       max=LIMITS["num_related_texts"], label="Number of related texts (k)")
            inputs.str("exclude_words", required=False, label="Exclude texts containing (comma-separated)",
                       description='e.g. "man, woman" to keep gender words out of a race attribute')
        inputs.str("model", default=_default("model"), required=False, label="CLIP model",
                   description="open_clip name, hf-hub:org/repo or local-dir:/path")
        inputs.str("pretrained", default=_default("pretrained"), required=False,
                   label="Pretrained tag or checkpoint file")
        inputs.str("embeddings_field", default=_default("embeddings_field"), required=False, label="Embeddings field")
        output_field_input(ctx, inputs, "features_field", compute_sa_features, "Features field")
        inputs.int("batch_size", default=_default("batch_size"), min=1, max=LIMITS["batch_size"], label="Batch size")
        inputs.bool("skip_failures", default=_default("skip_failures"), label="Skip unreadable images")
        shards_input(inputs)
        if (ctx.params.get("num_shards") or 1) > 1:
            inputs.str("cluster_field", required=False, label="Then cluster into (optional)",
                       description="A label field: when all shards are done, X-means on all the features writes "
                                   "pseudo-labels there (run 'pseudo_labels', as Compute pseudo-labels does)")
        run_key_input(ctx, inputs, compute_sa_features)
        clip_check(ctx, inputs, compute_sa_features)
        return types.Property(inputs, view=types.View(label="Compute SA features"))

    def resolve_delegation(self, ctx):
        return len(ctx.target_view()) > 2000

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        lists = {n: split_list(p.get(n)) or None for n in ("attribute_values", "related_texts", "exclude_words")}
        by_texts = text_source(p) == "texts"
        kwargs = dict(
            attribute=None if by_texts else (p.get("attribute") or "").strip() or None,
            attribute_values=None if by_texts else lists["attribute_values"],
            related_texts_override=lists["related_texts"] if by_texts else None,
            exclude_words=None if by_texts else lists["exclude_words"],
            **given(p, ("model", "pretrained", "embeddings_field", "features_field", "batch_size", "skip_failures",
                        "run_key", "overwrite") + (() if by_texts else ("num_related_texts",))),
        )
        cluster_field = (p.get("cluster_field") or "").strip()
        then = ("compute_pseudo_labels", {"label_field": cluster_field}) if cluster_field else None
        queued = queue_shards(ctx, "compute_sa_features", then=then, **kwargs)
        if queued:
            return queued
        result = compute_sa_features(ctx.target_view(), progress=progress_callback(ctx, "Encoding images"), **kwargs)
        refresh_app(ctx)
        out = result.to_dict()
        out["num_failures"] = len(result.failures)
        return rounded(out)

    def resolve_output(self, ctx):
        return result_view(
            ctx, "SA features computed",
            *SHARD_OUTPUTS,
            ("query", "str", "Query text (W_SA)"),
            ("num_samples", "int", "Samples with features"),
            ("num_encoded", "int", "Images encoded now (others reused stored embeddings)"),
            ("num_failures", "int", "Images that could not be loaded"),
            ("related_texts", "table", "Related texts chosen", related_texts_columns(ctx)),
        )
