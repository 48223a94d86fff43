"""Operator: sensitive-attribute features from a text-specified attribute."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance.sa_features import compute_sa_features

from ._common import operator_config, progress_callback, result_view, run_key_input


def _split(text):
    return [t.strip() for t in (text or "").split(",") if t.strip()]


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
        has_texts = bool(_split(ctx.params.get("related_texts")))
        inputs.str("attribute", required=not has_texts, label="Sensitive attribute",
                   description='What the data may be imbalanced in, e.g. "races" or "age groups" (not needed '
                               'when you give related texts)')
        inputs.str("attribute_values", required=False, label="Attribute values (optional, comma-separated)",
                   description='e.g. "white person, black person"')
        inputs.str("related_texts", required=False, label="Related texts (optional, comma-separated)",
                   description="Use these texts instead of choosing them from WordNet")
        inputs.int("num_related_texts", default=20, min=2, label="Number of related texts (k)")
        inputs.str("exclude_words", required=False, label="Exclude texts containing (comma-separated)",
                   description='e.g. "man, woman" to keep gender words out of a race attribute')
        inputs.str("model", default="ViT-B-32", required=False, label="CLIP model",
                   description="open_clip name, hf-hub:org/repo or local-dir:/path")
        inputs.str("pretrained", default="openai", required=False, label="Pretrained tag or checkpoint file")
        inputs.str("embeddings_field", default="clip_embedding", required=False, label="Embeddings field")
        inputs.str("features_field", default="sa_features", required=False, label="Features field")
        inputs.int("batch_size", default=64, min=1, label="Batch size")
        inputs.bool("skip_failures", default=False, label="Skip unreadable images")
        run_key_input(inputs, "sa_features")
        if not (ctx.params.get("attribute") or "").strip() and not has_texts:
            inputs.view("hint", types.Notice(label="Type an attribute (or related texts) to continue"))
        return types.Property(inputs, view=types.View(label="Compute SA features"))

    def resolve_delegation(self, ctx):
        return len(ctx.target_view()) > 2000

    def execute(self, ctx):
        p = ctx.params
        result = compute_sa_features(
            ctx.target_view(),
            attribute=p.get("attribute") or None,
            attribute_values=_split(p.get("attribute_values")) or None,
            related_texts_override=_split(p.get("related_texts")) or None,
            num_related_texts=int(p.get("num_related_texts", 20)),
            exclude_words=_split(p.get("exclude_words")) or None,
            model=p.get("model") or "ViT-B-32",
            pretrained=p.get("pretrained") or None,
            embeddings_field=p.get("embeddings_field") or "clip_embedding",
            features_field=p.get("features_field") or "sa_features",
            run_key=p.get("run_key") or "sa_features",
            batch_size=int(p.get("batch_size", 64)),
            skip_failures=bool(p.get("skip_failures", False)),
            overwrite=bool(p.get("overwrite", False)),
            progress=progress_callback(ctx, "Encoding images"),
        )
        ctx.ops.reload_dataset()
        out = result.to_dict()
        out["num_failures"] = len(result.failures)
        return out

    def resolve_output(self, ctx):
        return result_view(
            "SA features computed",
            ("query", "str", "Query text (W_SA)"),
            ("num_samples", "int", "Samples with features"),
            ("num_encoded", "int", "Images encoded now (others reused stored embeddings)"),
            ("num_failures", "int", "Images that could not be loaded"),
            ("related_texts", "table", "Related texts chosen",
             {"text": "Related text", "score": "Similarity to the query"}),
        )
