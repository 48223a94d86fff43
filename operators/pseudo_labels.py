"""Operator: X-means (or k-means) pseudo-labels of the SA features."""

import fiftyone as fo
import fiftyone.operators as foo
import fiftyone.operators.types as types

from fairbalance.pseudo_labels import compute_pseudo_labels

from ._common import field_dropdown, operator_config, result_view, run_key_input


def _vector_fields(dataset):
    if dataset is None:
        return []
    return [n for n, f in dataset.get_field_schema().items() if isinstance(f, (fo.VectorField, fo.ListField))]


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
        inputs.str("label_field", default="sa_cluster", required=False, label="Label field to write")
        method = types.RadioGroup()
        method.add_choice("xmeans", label="X-means (chooses the number of clusters)")
        method.add_choice("kmeans", label="k-means (fixed number of clusters)")
        inputs.enum("method", method.values(), default="xmeans", view=method, label="Algorithm")
        if ctx.params.get("method", "xmeans") == "kmeans":
            inputs.int("num_clusters", default=10, min=2, required=True, label="Number of clusters")
        else:
            inputs.int("kmax", default=20, min=2, label="Maximum clusters (kmax)")
            crit = types.Dropdown()
            crit.add_choice("pyclustering", label="pyclustering's BIC (reference implementation)")
            crit.add_choice("bic", label="BIC as in the X-means paper")
            inputs.enum("criterion", crit.values(), default="pyclustering", view=crit, label="Splitting criterion")
        inputs.int("seed", default=0, label="Seed")
        run_key_input(inputs, "pseudo_labels")
        return types.Property(inputs, view=types.View(label="Compute pseudo-labels"))

    def execute(self, ctx):
        p = ctx.params
        ctx.set_progress(progress=0.0, label="Clustering")
        result = compute_pseudo_labels(
            ctx.target_view(),
            features_field=p["features_field"],
            label_field=p.get("label_field") or "sa_cluster",
            method=p.get("method", "xmeans"),
            kmax=int(p.get("kmax", 20)),
            num_clusters=int(p["num_clusters"]) if p.get("num_clusters") else None,
            criterion=p.get("criterion", "pyclustering"),
            seed=int(p.get("seed", 0)),
            run_key=p.get("run_key") or "pseudo_labels",
            overwrite=bool(p.get("overwrite", False)),
        )
        ctx.set_progress(progress=1.0, label="Clustering done")
        ctx.ops.reload_dataset()
        out = result.to_dict()
        out["table"] = [{"cluster": k, "count": v} for k, v in result.counts.items()]
        return out

    def resolve_output(self, ctx):
        return result_view(
            "Pseudo-labels computed",
            ("num_clusters", "int", "Clusters found"),
            ("entropy", "float", "Entropy of the clusters (nats)"),
            ("normalized_entropy", "float", "Normalized entropy (1 = balanced)"),
            ("criterion", "str", "Splitting criterion used"),
            ("backend", "str", "Implementation"),
            ("table", "table", "Cluster sizes", {"cluster": "Cluster", "count": "Samples"}),
        )
