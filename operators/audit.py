"""Operator: one-click audit: SA features -> pseudo-labels -> balance report (``fairbalance.audit_balance``)."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import audit_balance

from ._common import streams_progress
from ._common import clip_check
from ._common import refresh_app
from ._common import (attribute_or_texts_input, categorical_fields, default_of, field_dropdown, given,
                      operator_config, progress_callback, related_texts_columns, result_view, rounded, run_key_input,
                      split_list, text_source)
from ._common import COUNT_COLUMNS, CROSS_COLUMNS, count_rows, cross_rows, plain_reading


class AuditBalance(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "audit_balance", "fairbalance: audit hidden imbalance",
            "Type an attribute; get SA features, X-means pseudo-labels and their balance in one go",
            "troubleshoot",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        attribute_or_texts_input(ctx, inputs, 'e.g. "races"')
        inputs.str("model", default=default_of(audit_balance, "model"), required=False, label="CLIP model")
        inputs.str("pretrained", default=default_of(audit_balance, "pretrained"), required=False,
                   label="Pretrained tag or checkpoint")
        fields = categorical_fields(ctx.dataset) if ctx.dataset is not None else []
        field_dropdown(inputs, "attribute_field", fields, "Known attribute (optional)",
                       "A field with the attribute's true values, if you have one: the report then shows "
                       "clusters x attribute", required=False)
        run_key_input(ctx, inputs, audit_balance)
        clip_check(ctx, inputs, audit_balance)
        return types.Property(inputs, view=types.View(label="Audit hidden imbalance"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        by_texts = text_source(p) == "texts"
        res = audit_balance(ctx.target_view(), None if by_texts else (p.get("attribute") or "").strip() or None,
                            related_texts_override=split_list(p.get("related_texts")) if by_texts else None,
                            progress=progress_callback(ctx, "Encoding images"),
                            **given(p, ("model", "pretrained", "attribute_field", "run_key", "overwrite")))
        refresh_app(ctx)
        report = res.report
        return rounded({"related_texts": res.sa_features.related_texts, "num_clusters": res.pseudo_labels.num_clusters,
                        "entropy": report.entropy, "normalized_entropy": report.normalized_entropy,
                        "imbalance_ratio": report.imbalance_ratio, "cross_rows": cross_rows(report),
                        "table": count_rows(report), "reading": plain_reading(report)})

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Audit",
            ("reading", "str", "In plain words"),
            ("num_clusters", "int", "Pseudo-label clusters"),
            ("normalized_entropy", "float", "Normalized entropy (1 = balanced)"),
            ("imbalance_ratio", "float", "Imbalance ratio (largest / smallest)"),
            ("table", "table", "Samples per cluster", COUNT_COLUMNS),
            ("related_texts", "table", "Related texts", related_texts_columns(ctx)),
            ("cross_rows", "table", "Clusters x known attribute", CROSS_COLUMNS),
        )
