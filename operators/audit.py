"""Operator: one-click audit: SA features -> pseudo-labels -> balance report, with defaults."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance.balance import balance_report
from fairbalance.pseudo_labels import compute_pseudo_labels
from fairbalance.sa_features import compute_sa_features

from ._common import operator_config, progress_callback, result_view


class AuditBalance(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "audit_balance", "fairbalance: audit hidden imbalance",
            "Type an attribute; get SA features, X-means pseudo-labels and their balance in one go",
            "troubleshoot", dynamic=False,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        inputs.str("attribute", required=True, label="Sensitive attribute", description='e.g. "races"')
        inputs.str("model", default="ViT-B-32", required=False, label="CLIP model")
        inputs.str("pretrained", default="openai", required=False, label="Pretrained tag or checkpoint")
        inputs.bool("overwrite", default=True, label="Replace a previous audit")
        return types.Property(inputs, view=types.View(label="Audit hidden imbalance"))

    def execute(self, ctx):
        p = ctx.params
        view = ctx.target_view()
        overwrite = bool(p.get("overwrite", True))
        sa = compute_sa_features(view, p["attribute"], model=p.get("model") or "ViT-B-32",
                                 pretrained=p.get("pretrained") or None, overwrite=overwrite,
                                 progress=progress_callback(ctx, "Encoding images"))
        ctx.set_progress(progress=0.9, label="Clustering")
        pl = compute_pseudo_labels(view, overwrite=overwrite)
        report = balance_report(view, pl.label_field)
        ctx.ops.reload_dataset()
        return {"related_texts": sa.related_texts, "num_clusters": pl.num_clusters, "entropy": report.entropy,
                "normalized_entropy": report.normalized_entropy, "imbalance_ratio": report.imbalance_ratio,
                "summary": report.format()}

    def resolve_output(self, ctx):
        return result_view(
            "Audit",
            ("num_clusters", "int", "Pseudo-label clusters"),
            ("normalized_entropy", "float", "Normalized entropy (1 = balanced)"),
            ("imbalance_ratio", "float", "Imbalance ratio"),
            ("related_texts", "table", "Related texts", {"text": "Related text", "score": "Score"}),
            ("summary", "text", "Report"),
        )
