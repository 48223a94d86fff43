"""Operator: entropy and balance of a label field over the current view."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import balance_report

from ._common import CROSS_COLUMNS, cross_rows
from ._common import (as_text_block, categorical_fields, field_dropdown, given, operator_config, result_view,
                      rounded)


class BalanceReport(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "balance_report", "fairbalance: balance report",
            "Counts, entropy, normalized entropy and imbalance ratio of a label field",
            "balance", delegated=None,
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        fields = categorical_fields(ctx.dataset)
        if not fields:
            inputs.view(
                "no_fields",
                types.Error(
                    label="No label field",
                    description="Add a Classification field first, e.g. with 'compute pseudo-labels'",
                ),
            )
            return types.Property(inputs)
        field_dropdown(inputs, "label_field", fields, "Label field", "Classes or clusters to count", default=fields[0])
        field_dropdown(
            inputs, "attribute_field", fields, "Attribute field (optional)",
            "A second field for the clusters x attribute table (majority, purity)", required=False,
        )
        inputs.str("run_key", required=False, label="Save as run (optional)",
                   description="Store this report on the dataset under this run key, e.g. to compare before/after")
        inputs.bool("overwrite", default=False, label="Overwrite an existing run with this key")
        return types.Property(inputs, view=types.View(label="Balance report"))

    def execute(self, ctx):
        p = ctx.params
        report = balance_report(ctx.target_view(), p["label_field"],
                                        **given(p, ("attribute_field", "run_key", "overwrite")))
        out = report.to_dict()
        out["table"] = [
            {"label": k, "count": v, "percent": round(100 * report.proportions[k], 2)} for k, v in report.counts.items()
        ]
        out["cross_rows"] = cross_rows(report)
        out["summary"] = as_text_block(report.format())
        return rounded(out)

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Balance report",
            ("entropy", "float", "Entropy (nats)"),
            ("normalized_entropy", "float", "Normalized entropy (1 = balanced)"),
            ("imbalance_ratio", "float", "Imbalance ratio (largest / smallest)"),
            ("num_classes", "int", "Classes"),
            ("table", "table", "Counts", {"label": "Class", "count": "Count", "percent": "%"}),
            ("cross_rows", "table", "Classes x attribute", CROSS_COLUMNS),
            ("summary", "text", "Report"),
        )
