"""The Balance panel: counts, entropy and imbalance of a label field over the current view,
original vs. original + generated, the clusters x attribute heat map, and the
related texts of the last SA run. All numbers come from
:func:`fairbalance.balance.balance_summary` (database aggregations)."""

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F

from fairbalance import balance, fields


def summary_bar_traces(summary: dict) -> list[dict]:
    """Plotly bar traces of a :func:`balance_summary`: original, and original + generated if any."""
    classes = summary["classes"]
    traces = [{"type": "bar", "name": "original", "x": classes,
               "y": [summary["before"]["counts"].get(c, 0) for c in classes]}]
    if summary.get("after"):
        traces.append({"type": "bar", "name": "original + generated", "x": classes,
                       "y": [summary["after"]["counts"].get(c, 0) for c in classes]})
    return traces


class BalancePanel(foo.Panel):
    @property
    def config(self):
        return foo.PanelConfig(
            name="balance_panel",
            label="Balance",
            description="Entropy and balance of a label field, before and after adding generated samples",
            icon="balance",
            surfaces="grid",
        )

    # ------------------------------------------------------------------ events

    def on_load(self, ctx):
        return self._refresh(ctx)

    def on_change_view(self, ctx):
        return self._refresh(ctx)

    def on_change_dataset(self, ctx):
        return self._refresh(ctx)

    def on_change_field(self, ctx):
        ctx.panel.state.label_field = ctx.params.get("value")
        return self._refresh(ctx, label_field=ctx.params.get("value"))

    def on_change_attribute(self, ctx):
        ctx.panel.state.attribute_field = ctx.params.get("value") or None
        return self._refresh(ctx, attribute_field=ctx.params.get("value") or None)

    def on_click_bar(self, ctx):
        """Filter the App's view to the clicked class/cluster."""
        label = ctx.params.get("x")
        field = self._label_field(ctx)
        if label is None or field is None:
            return None
        path = fields.label_path(ctx.dataset, field)
        view = ctx.view.match(F(path) == str(label))
        if len(view) == 0 and str(label).lstrip("-").isdigit():
            view = ctx.view.match(F(path) == int(label))
        ctx.ops.set_view(view)
        return {"filtered_to": str(label), "num_samples": len(view)}

    # ------------------------------------------------------------------ state

    def _fields(self, ctx):
        return fields.categorical_fields(ctx.dataset)

    def _label_field(self, ctx, override=None):
        fields = self._fields(ctx)
        chosen = override or ctx.panel.state.label_field
        if chosen in fields:
            return chosen
        for preferred in ("sa_cluster", "ground_truth"):
            if preferred in fields:
                return preferred
        return fields[0] if fields else None

    def _refresh(self, ctx, label_field=None, attribute_field=None):
        field = self._label_field(ctx, label_field)
        attr = attribute_field if attribute_field is not None else ctx.panel.state.attribute_field
        if attr not in self._fields(ctx) or attr == field:
            attr = None
        summary = None
        if field is not None and len(ctx.view) > 0:
            try:
                summary = balance.balance_summary(ctx.view, field, attribute_field=attr)
            except ValueError as e:
                summary = {"error": str(e)}
        ctx.panel.state.label_field = field
        ctx.panel.state.attribute_field = attr
        ctx.panel.state.summary = summary
        return summary

    # ------------------------------------------------------------------ render

    def render(self, ctx):
        panel = types.Object()
        fields = self._fields(ctx)
        if not fields:
            panel.md(
                "### No label field yet\n"
                "Balance needs a Classification field. Run **fairbalance: compute sensitive-attribute "
                "features** then **compute pseudo-labels**, or load labels into the dataset.",
                name="empty",
            )
            return types.Property(panel, view=types.GridView(align_x="center", align_y="center"))
        state = ctx.panel.state
        field_choices = types.DropdownView()
        for f in fields:
            field_choices.add_choice(f, label=f)
        panel.enum("label_field", field_choices.values(), view=field_choices, label="Label field",
                   default=state.label_field, on_change=self.on_change_field)
        attr_choices = types.DropdownView()
        for f in fields:
            attr_choices.add_choice(f, label=f)
        panel.enum("attribute_field", attr_choices.values(), view=attr_choices, label="Attribute (optional)",
                   default=state.attribute_field, on_change=self.on_change_attribute)

        summary = state.summary
        if not summary:
            panel.md("The current view is empty." if len(ctx.view) == 0 else "Pick a label field.", name="note")
            return types.Property(panel, view=types.GridView(orientation="vertical"))
        if "error" in summary:
            panel.md(f"**Cannot compute balance:** {summary['error']}", name="error")
            return types.Property(panel, view=types.GridView(orientation="vertical"))

        panel.md(_numbers_markdown(summary), name="numbers")
        panel.plot("counts", data=summary_bar_traces(summary), layout={
            "barmode": "group", "xaxis": {"title": {"text": summary["label_field"]}, "type": "category"},
            "yaxis": {"title": {"text": "samples"}}, "margin": {"t": 30},
        }, on_click=self.on_click_bar, height=320, width="100%")
        if summary.get("heatmap"):
            hm = summary["heatmap"]
            panel.plot("purity", data=[{"type": "heatmap", "x": hm["x"], "y": hm["y"], "z": hm["z"],
                                        "colorscale": "Viridis"}],
                       layout={"xaxis": {"title": {"text": summary["attribute_field"]}},
                               "yaxis": {"title": {"text": summary["label_field"]}, "type": "category"},
                               "margin": {"t": 30}}, height=320, width="100%")
        if summary.get("related_texts"):
            rows = "\n".join(f"| {r['text']} | {_score(r.get('score'))} |" for r in summary["related_texts"])
            panel.md("**Related texts of the last SA run**\n\n| text | score |\n|---|---|\n" + rows, name="texts")
        return types.Property(panel, view=types.GridView(orientation="vertical"))


def _score(value):
    return "" if value is None else f"{value:.3f}"


def _numbers_markdown(summary):
    def line(name, r):
        return (f"| {name} | {r['num_samples']} | {r['entropy']:.3f} / {r['max_entropy']:.3f} | "
                f"{r['normalized_entropy']:.3f} | {r['imbalance_ratio']:.2f} |")

    rows = [line("original", summary["before"])]
    if summary.get("after"):
        rows.append(line("original + generated", summary["after"]))
    return ("| | samples | entropy / ln C | normalized | imbalance ratio |\n|---|---|---|---|---|\n"
            + "\n".join(rows))
