"""The Balance panel: counts, entropy and imbalance of a label field over the current view,
original vs. original + generated, the clusters x attribute heat map, and the
related texts of the last SA run. All numbers come from
:func:`fairbalance.find.balance.balance_summary` (database aggregations)."""

import fiftyone.operators as foo
import fiftyone.operators.types as types
from fiftyone import ViewField as F

from fairbalance.core import fields
from fairbalance.find import balance


def summary_bar_traces(summary: dict, show: str = "both") -> list[dict]:
    """Plotly bar traces of a :func:`balance_summary`: real, and real + generated if any (``show`` picks)."""
    classes = summary["classes"]
    real = {"type": "bar", "name": "real", "x": classes, "y": [summary["before"]["counts"].get(c, 0) for c in classes],
            "marker": {"color": "#7f7f7f"}}
    if not summary.get("after"):
        return [real]
    both = {"type": "bar", "name": "real + generated", "x": classes,
            "y": [summary["after"]["counts"].get(c, 0) for c in classes], "marker": {"color": "#ff6d04"}}
    return {"before": [real], "after": [both]}.get(show, [real, both])


MAX_GROUPS = 100  # integer fields with more distinct values are indices, not groups


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
        _set_state(ctx, "label_field", ctx.params.get("value"))
        return self._refresh(ctx, label_field=ctx.params.get("value"))

    def on_change_attribute(self, ctx):
        _set_state(ctx, "attribute_field", ctx.params.get("value") or None)
        return self._refresh(ctx, attribute_field=ctx.params.get("value") or None)

    def on_change_show(self, ctx):
        ctx.panel.state.show = ctx.params.get("value") or "both"

    def on_click_bar(self, ctx):
        """Filter the App's view to the clicked class/cluster (the numbers stay those of the whole view)."""
        label = ctx.params.get("x")
        field = self._label_field(ctx)
        if label is None or field is None:
            return None
        self._refresh(ctx)  # the numbers of the view before the click (the selection must not reset them)
        path = fields.label_path(ctx.dataset, field)
        view = ctx.view.match(F(path) == str(label))
        if len(view) == 0 and str(label).lstrip("-").isdigit():
            view = ctx.view.match(F(path) == int(label))
        ctx.panel.state.filtered_to = str(label)
        ctx.ops.set_view(view)
        return {"filtered_to": str(label), "num_samples": len(view)}

    def on_click_cell(self, ctx):
        """Filter the App's view to the clicked class x attribute cell (e.g. the bias-conflicting ones)."""
        label, attr = ctx.params.get("y"), ctx.params.get("x")
        field = self._label_field(ctx)
        attr_field = ctx.panel.state.attribute_field
        if label is None or attr is None or field is None or attr_field is None:
            return None
        self._refresh(ctx)  # the numbers of the view before the click (the selection must not reset them)
        path, apath = fields.label_path(ctx.dataset, field), fields.label_path(ctx.dataset, attr_field)
        view = None
        for lv in _typed(label):
            for av in _typed(attr):
                view = ctx.view.match((F(path) == lv) & (F(apath) == av))  # one stage: "Clear selection" removes it
                if len(view.limit(1)):
                    break
            if len(view.limit(1)):
                break
        _set_state(ctx, "filtered_to", f"{label} x {attr}")
        ctx.ops.set_view(view)
        return {"filtered_to": f"{label} x {attr}", "num_samples": len(view)}

    def on_click_refresh(self, ctx):
        """Read the progress of running sharded runs again (and the numbers, which they change)."""
        return self._refresh(ctx)

    def on_click_clear(self, ctx):
        """Back to the whole view after a bar click."""
        self._refresh(ctx)
        ctx.panel.state.filtered_to = None
        ctx.ops.clear_view()
        return {"cleared": True}

    # ------------------------------------------------------------------ state

    def _fields(self, ctx):
        """Fields whose values are groups: labels, strings, small integer codes (not flags or indices)."""
        import fiftyone as fo

        from fairbalance.core import summary_cache

        def group_fields():
            out = []
            for name in fields.categorical_fields(ctx.dataset):
                f = ctx.dataset.get_field(name)
                if isinstance(f, fo.BooleanField):
                    continue
                if isinstance(f, fo.IntField) and len(ctx.dataset.distinct(name)) > MAX_GROUPS:
                    continue  # (a full pass per integer field: cached while the dataset is unchanged)
                out.append(name)
            return out

        return summary_cache.cached(ctx.dataset, "panel_group_fields", {"max_groups": MAX_GROUPS}, group_fields)

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
        """Compute the numbers of the current view for :meth:`render`; returns the summary.

        Only the user's choices go into the panel's state, and only when they
        change: the App saves panel state with its spaces, and saving spaces
        reloads the dataset page, which drops the user's sidebar filters
        (numbers written on every view change reverted a filter within a second).
        """
        field = self._label_field(ctx, label_field)
        view = ctx.view
        if ctx.panel.state.filtered_to is not None:  # after a bar click the numbers stay those of the whole view
            base = _without_last_match(ctx.view)
            if base is None:  # the user changed the view since: the selection is gone
                _set_state(ctx, "filtered_to", None)
            else:
                view = base
        attr = attribute_field if attribute_field is not None else ctx.panel.state.attribute_field
        if attr not in self._fields(ctx) or attr == field:
            attr = None
        summary = None
        if field is not None and len(view.limit(1)):  # (stops at the first sample: no full count)
            try:  # cached while the dataset is unchanged: a full pass over 1M samples takes seconds
                summary = balance.balance_summary(view, field, attribute_field=attr, cache=True)
                summary["worst_groups"] = _last_evaluation(ctx.dataset)
            except ValueError as e:
                summary = {"error": str(e)}
        _set_state(ctx, "label_field", field)
        _set_state(ctx, "attribute_field", attr)
        ctx.fairbalance_panel = {"summary": summary, "sharded": _sharded_rows(ctx.dataset)}
        return summary

    def _computed(self, ctx):
        """What :meth:`_refresh` computed for this event (computed now for events that did not refresh)."""
        if getattr(ctx, "fairbalance_panel", None) is None:
            self._refresh(ctx)
        return ctx.fairbalance_panel

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
        computed = self._computed(ctx)
        panel.md("**Balance of a label field.** How evenly the samples spread over its groups: entropy, normalized "
                 "entropy (1 = balanced) and largest / smallest group, for the real samples and with the generated "
                 "ones. Click a bar to show that group's samples.", name="help")
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

        if computed["sharded"]:
            rows = "\n".join(f"| {r['run_key']} | {r['function']} | {r['shards']} | {r['samples']} | {r['state']} |"
                             for r in computed["sharded"])
            panel.md("**Sharded runs in progress** (delegated operations; one per shard)\n\n"
                     "| run | function | shards done | done (samples, or images for generators) | state |\n"
                     "|---|---|---|---|---|\n" + rows, name="sharded_progress")  # ("sharded" was a state key)
            panel.btn("refresh", label="Refresh progress", on_click=self.on_click_refresh)
        summary = computed["summary"]
        if not summary:
            panel.md("The current view is empty." if len(ctx.view) == 0 else "Pick a label field.", name="note")
            return types.Property(panel, view=types.GridView(orientation="vertical"))
        if "error" in summary:
            panel.md(f"**Cannot compute balance:** {summary['error']}", name="error")
            return types.Property(panel, view=types.GridView(orientation="vertical"))

        if state.filtered_to is not None:
            panel.md(f"The grid is filtered to **{self._label_field(ctx)} = {state.filtered_to}** (your click); "
                     "the numbers below are the whole view's.",
                     name="filtered")
            panel.btn("clear", label="Clear selection", on_click=self.on_click_clear)
        panel.md(_numbers_markdown(summary), name="numbers")
        if summary.get("after") and summary.get("generated_counted_by"):
            panel.md(_counted_by_line(summary), name="generated_counted_by")
        show = state.show or "both"
        if summary.get("after"):
            toggle = types.RadioGroup(orientation="horizontal")
            toggle.add_choice("both", label="real and real + generated")
            toggle.add_choice("before", label="real only")
            toggle.add_choice("after", label="real + generated")
            panel.enum("show", toggle.values(), view=toggle, default=show, on_change=self.on_change_show)
        panel.plot("counts", data=summary_bar_traces(summary, show), layout={
            "barmode": "group", "xaxis": {"title": {"text": summary["label_field"]}, "type": "category"},
            "yaxis": {"title": {"text": "samples"}}, "margin": {"t": 30},
        }, on_click=self.on_click_bar, height=320, width="100%")
        maps = [("purity", "real", summary.get("heatmap"))]
        if summary.get("heatmap_after"):
            maps.append(("purity_after", "real + generated", summary["heatmap_after"]))
            maps = {"before": maps[:1], "after": maps[1:]}.get(show, maps)
        for name, title, hm in maps:
            if not hm:
                continue
            counts = hm.get("counts")
            trace = {"type": "heatmap", "x": hm["x"], "y": hm["y"], "z": hm["z"], "colorscale": "Viridis",
                     "zmin": 0, "zmax": 1, "colorbar": {"title": {"text": "share of the group", "side": "right"}}}
            if counts:  # the counts behind each share, in the tooltip
                trace["customdata"] = counts
                trace["hovertemplate"] = (f"{summary['label_field']} %{{y}}, {summary['attribute_field']} %{{x}}: "
                                          "%{customdata} samples (%{z:.0%} of the group)<extra>" + title +
                                          "</extra>")
            panel.plot(name, data=[trace], on_click=self.on_click_cell,
                       layout={"title": {"text": f"{title}: click a cell to show its samples", "font": {"size": 13}},
                               "xaxis": {"title": {"text": summary["attribute_field"], "standoff": 12},
                                         "type": "category", "dtick": 1, "tickangle": -45, "automargin": True},
                               "yaxis": {"title": {"text": summary["label_field"], "standoff": 12},
                                         "type": "category", "dtick": 1, "automargin": True},
                               "margin": {"t": 40}}, height=360, width="100%")
        if summary.get("worst_groups"):
            ev = summary["worst_groups"]
            rows = "\n".join(f"| {cls} | {attr} | {a:.3f} |" for (cls, attr), a in
                             ((_class_and_attribute(g), a) for g, a in ev["groups"]))
            panel.md(f"**Worst groups of the last evaluation** (`{ev['run_key']}`, accuracy {ev['accuracy']:.3f})"
                     f"\n\n| class | attribute | accuracy |\n|---|---|---|\n{rows}", name="worst")
        if summary.get("related_texts"):
            texts = summary["related_texts"]
            if any(r.get("score") is not None for r in texts):
                table = "| text | score |\n|---|---|\n" + "\n".join(
                    f"| {r['text']} | {_score(r.get('score'))} |" for r in texts)
            else:  # the user's own texts: no query, so no similarity to show
                table = "| text (given by the user) |\n|---|\n" + "\n".join(f"| {r['text']} |" for r in texts)
            panel.md("**Related texts of the last SA run**\n\n" + table, name="texts")
        return types.Property(panel, view=types.GridView(orientation="vertical"))


def _typed(value):
    """A clicked category as the field may store it: the string, and the integer it spells."""
    text = str(value)
    return [text, int(text)] if text.lstrip("-").isdigit() else [text]


def _set_state(ctx, key, value):
    """Write ``key`` of the panel's state only when it changes (each write makes the App save its spaces)."""
    if ctx.panel.state.get(key) != value:
        ctx.panel.state.set(key, value)


def _sharded_rows(dataset):
    """One row per sharded run of the dataset that is not finished: its overall progress."""
    from fairbalance.core import sharding

    rows = []
    for st in sharding.list_jobs(dataset, unfinished_only=True)[:10]:
        then = [t for t in st["then"] if t["state"] != "done"]
        state = ("merging" if st["shards_done"] == st["num_shards"] and not st["merged"] else
                 f"then: {then[0]['function']} ({then[0]['state']})" if st["merged"] and then else
                 ", ".join(sorted({s["state"] for s in st["shards"]})))
        rows.append({"run_key": st["run_key"], "function": st["function"],
                     "shards": f"{st['shards_done']} / {st['num_shards']}",
                     "samples": f"{st['num_done']} / {st['num_items']} ({100 * st['progress']:.0f}%)",
                     "state": state})
    return rows


def _without_last_match(view):
    """The view before the panel's bar-click filter (its last stage), or None when it is not one."""
    from fiftyone.core.stages import Match

    stages = view._stages
    if not stages or not isinstance(stages[-1], Match):
        return None
    base = view._dataset.view()
    for stage in stages[:-1]:
        base = base.add_stage(stage)
    return base


def _last_evaluation(dataset, top=8):
    """The worst groups of the newest evaluate_classifier run with an attribute, or None."""
    from fairbalance.core import runs

    for key in reversed(runs.list_runs(dataset, "evaluate_classifier")):
        res = runs.load_run_results(dataset, key)
        if res.get("group_accuracy"):
            worst = sorted(res["group_accuracy"].items(), key=lambda kv: kv[1])[:top]
            return {"run_key": key, "accuracy": res["accuracy"], "groups": worst}
    return None


def _class_and_attribute(group):
    """A "class|attribute" group key as two table cells (a "|" inside a Markdown cell would split it)."""
    cls, _, attr = str(group).partition("|")
    return cls, attr if attr not in ("", "None") else "(no value)"


def _score(value):
    return "" if value is None else f"{value:.3f}"


def _numbers_markdown(summary):
    def line(name, r):
        return (f"| {name} | {r['num_samples']} | {abs(r['entropy']):.3f} / {r['max_entropy']:.3f} | "
                f"{abs(r['normalized_entropy']):.3f} | {r['imbalance_ratio']:.2f} |")

    rows = [line("real", summary["before"])]
    if summary.get("after"):
        rows.append(line("real + generated", summary["after"]))
    return ("| | samples | entropy (of the most possible) | balance (1 = even) | largest / smallest group |\n"
            "|---|---|---|---|---|\n"
            + "\n".join(rows))


def _counted_by_line(summary):
    """Which group the "real + generated" numbers count each generated sample in (as the gate counts them)."""
    if summary.get("generated_assigned"):
        return ("Generated samples counted by the cluster their features are nearest to: "
                f"{summary['generated_counted_by']}.")
    return f"Generated samples counted by their planned cluster: {summary['generated_counted_by']}."
