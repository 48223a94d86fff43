"""Operator: X-means (or k-means) pseudo-labels of the SA features."""

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance import compute_pseudo_labels

from ._common import streams_progress
from ._common import LIMITS, output_field_input, refresh_app
from ._common import default_of, field_dropdown, given, operator_config, result_view, rounded, run_key_input


def _vector_fields(dataset):
    if dataset is None:
        return []
    return [n for n, f in dataset.get_field_schema().items() if isinstance(f, (fo.VectorField, fo.ListField))]


def _default(name):
    return default_of(compute_pseudo_labels, name)


class ComputePseudoLabels(foo.Operator):
    @property
    def config(self):
        return operator_config(
            "compute_pseudo_labels", "fairbalance: compute pseudo-labels",
            "Cluster the SA features with X-means (at most kmax clusters) into a label field",
            "scatter_plot",
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        fields = _vector_fields(ctx.dataset)
        if not fields:
            inputs.view("no_fields", types.Error(label="No feature field",
                                                 description="Run 'compute sensitive-attribute features' first"))
            return types.Property(inputs)
        default = "sa_features" if "sa_features" in fields else fields[0]
        field_dropdown(inputs, "features_field", fields, "Features field", "SA features to cluster", default=default)
        output_field_input(ctx, inputs, "label_field", compute_pseudo_labels, "Label field to write")
        method = types.RadioGroup()
        method.add_choice("xmeans", label="X-means (chooses the number of clusters)")
        method.add_choice("kmeans", label="k-means (fixed number of clusters)")
        inputs.enum("method", method.values(), default=_default("method"), view=method, label="Algorithm")
        if ctx.params.get("method") == "kmeans":
            inputs.int("num_clusters", default=10, min=2, max=LIMITS["num_clusters"], required=True,
                       label="Number of clusters")
        else:
            inputs.int("kmax", default=_default("kmax"), min=2, max=LIMITS["kmax"], label="Maximum clusters (kmax)")
            crit = types.Dropdown()
            crit.add_choice("pyclustering", label="pyclustering's BIC (reference implementation)")
            crit.add_choice("bic", label="BIC as in the X-means paper")
            inputs.enum("criterion", crit.values(), default=_default("criterion"), view=crit,
                        label="Splitting criterion")
        inputs.int("seed", default=_default("seed"), max=LIMITS["seed"], label="Seed")
        run_key_input(ctx, inputs, compute_pseudo_labels)
        return types.Property(inputs, view=types.View(label="Compute pseudo-labels"))

    @streams_progress
    def execute(self, ctx):
        p = ctx.params
        ctx.set_progress(progress=0.0, label="Clustering")
        result = compute_pseudo_labels(
            ctx.target_view(), features_field=p["features_field"],
            **given(p, ("label_field", "method", "kmax", "num_clusters", "criterion", "seed", "run_key", "overwrite")),
        )
        ctx.set_progress(progress=1.0, label="Clustering done")
        refresh_app(ctx)
        out = result.to_dict()
        out["table"] = [{"cluster": k, "count": v} for k, v in result.counts.items()]
        out["how"] = ("X-means, " + {"pyclustering": "pyclustering's BIC splitting rule",
                                     "bic": "the X-means paper's BIC"}.get(result.criterion, str(result.criterion))
                      + f" ({result.backend})" if result.method == "xmeans" else "k-means")
        return rounded(out)

    def resolve_output(self, ctx):
        return result_view(
            ctx, "Pseudo-labels computed",
            ("num_clusters", "int", "Clusters found"),
            ("entropy", "float", "Entropy of the clusters (nats)"),
            ("normalized_entropy", "float", "Normalized entropy (1 = balanced)"),
            ("how", "str", "Clustering"),
            ("table", "table", "Cluster sizes", {"cluster": "Cluster", "count": "Samples"}),
        )
