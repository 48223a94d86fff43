"""Operator: entropy and balance of a label field over the current view."""

import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance.find import balance

from ._common import categorical_fields, field_dropdown, given, operator_config, result_view, rounded


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
        report = balance.balance_report(ctx.target_view(), p["label_field"],
                                        **given(p, ("attribute_field", "run_key", "overwrite")))
        out = report.to_dict()
        out["table"] = count_rows(report)
        out["cross_rows"] = cross_rows(report)
        out["reading"] = plain_reading(report)
        return rounded(out)

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Balance report",
            ("entropy", "float", "Entropy (nats)"),
            ("normalized_entropy", "float", "Normalized entropy (1 = balanced)"),
            ("imbalance_ratio", "float", "Imbalance ratio (largest / smallest)"),
            ("reading", "str", "In plain words"),
            ("num_classes", "int", "Classes"),
            ("table", "table", "Samples per class or cluster", COUNT_COLUMNS),
            ("cross_rows", "table", "Classes x attribute", CROSS_COLUMNS),
        )


COUNT_COLUMNS = {"label": "Class / cluster", "count": "Samples", "percent": "Share", "note": "Note"}

#: Groups with fewer samples than this are flagged: their shares and accuracies rest on too few samples.
SMALL_GROUP = 5


def count_rows(report):
    """Samples per class or cluster, largest first, shares as percentages, small ones flagged."""
    total = sum(report.counts.values()) or 1
    return [{"label": str(k), "count": v, "percent": f"{100 * v / total:.1f}%",
             "note": f"small (under {SMALL_GROUP} samples)" if v < SMALL_GROUP else ""}
            for k, v in sorted(report.counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]


def plain_reading(report):
    """One sentence on how balanced the counts are, without the formulas."""
    counts = [v for v in report.counts.values() if v]
    if not counts:
        return "No samples with a value in this field"
    big, small = max(counts), min(counts)
    ne = report.normalized_entropy
    verdict = ("close to balanced" if ne is not None and ne >= 0.95 else
               "somewhat imbalanced" if ne is not None and ne >= 0.8 else "strongly imbalanced")
    return (f"{len(counts)} groups, {verdict}: the largest has {big} samples, the smallest {small}"
            + (f" ({big / small:.1f}x fewer)" if small and big != small else "")
            + (f"; balance score {ne:.2f} of 1 (1 = every group the same size)" if ne is not None else ""))


CROSS_COLUMNS = {"cluster": "Class / cluster", "count": "Samples", "majority": "Most common attribute value",
                 "purity": "Its share (purity)"}


def cross_rows(report):
    """The clusters x attribute table of a report as table rows (None without an attribute field)."""
    return [{"cluster": r.cluster, "count": r.count, "majority": r.majority, "purity": r.purity}
            for r in report.cross_table] or None
