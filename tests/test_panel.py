"""The Balance panel's callbacks, executed through FiftyOne's operator executor."""

import fiftyone as fo
import fiftyone.operators as foo
import pytest
from fiftyone import ViewField as F

from fairbalance.find import balance


def _panel_module():
    """The panel's module, loaded from the plugin folder (it is not part of the library)."""
    import importlib.util
    import os

    from conftest import REPO_ROOT

    spec = importlib.util.spec_from_file_location("fb_balance_panel", os.path.join(REPO_ROOT, "panels",
                                                                                    "balance_panel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

PANEL = "@fairbalance/fairbalance/balance_panel"


def _call(dataset, method, view=None, state=None, **params):
    ctx = {"dataset": dataset.name, "params": {"__method__": method, "panel_id": "test-panel",
                                                "panel_state": state or {}, **params}}
    if view is not None:
        ctx["view"] = view
    result = foo.execute_operator(PANEL, ctx=ctx)
    assert result.error is None, result.error
    return result.result


def test_panel_on_load_and_view_change(digits_copy):
    summary = _call(digits_copy, "on_load", state={"label_field": "color"})
    assert summary["label_field"] == "color"
    sdk = balance.balance_report(digits_copy, "color")
    assert summary["before"]["counts"] == sdk.counts
    assert summary["before"]["entropy"] == pytest.approx(sdk.entropy)
    assert summary["after"] is None
    test = digits_copy.match_tags("test")
    changed = _call(digits_copy, "on_change_view", view=test, state={"label_field": "color"})
    assert changed["before"]["num_samples"] == len(test)


def test_panel_heatmap_and_field_change(digits_copy):
    summary = _call(digits_copy, "on_change_attribute", state={"label_field": "ground_truth"}, value="color")
    hm = summary["heatmap"]
    assert hm["y"] == [str(c) for c in range(10)] and "red" in hm["x"]
    assert all(abs(sum(row) - 1) < 1e-9 for row in hm["z"])
    changed = _call(digits_copy, "on_change_field", value="color")
    assert changed["label_field"] == "color"


def test_panel_click_filters_view_keeps_the_numbers_and_clears(digits_copy):
    result = _call(digits_copy, "on_click_bar", state={"label_field": "ground_truth"}, x="3")
    assert result == {"filtered_to": "3", "num_samples": len(digits_copy.match({"ground_truth.label": "3"}))}
    # the App then reports the filtered view: the numbers stay those of the whole view, not one bar
    filtered = digits_copy.match({"ground_truth.label": "3"})
    after = _call(digits_copy, "on_change_view", view=filtered, state={"label_field": "ground_truth",
                                                                         "filtered_to": "3"})
    assert after["before"]["num_samples"] == len(digits_copy) and len(after["before"]["counts"]) == 10
    assert _call(digits_copy, "on_click_clear", state={"filtered_to": "3"}) == {"cleared": True}
    # a view the user changed by hand is not the panel's selection: its numbers are shown
    own = _call(digits_copy, "on_change_view", view=digits_copy.match_tags("test"),
                state={"label_field": "ground_truth", "filtered_to": "3"})
    assert own["before"]["num_samples"] == len(digits_copy.match_tags("test"))


def test_panel_offers_group_fields_and_the_last_evaluation(digits_copy):
    from fairbalance import evaluate_classifier

    digits_copy.set_values("pred", [fo.Classification(label=v) for v in digits_copy.values("ground_truth.label")])
    evaluate_classifier(digits_copy, "pred", "ground_truth", attribute_field="color", run_key="ev")
    summary = _call(digits_copy, "on_load", state={"label_field": "ground_truth"})
    assert summary["worst_groups"]["run_key"] == "ev" and summary["worst_groups"]["accuracy"] == 1.0
    panel = _panel_module().BalancePanel()

    class Ctx:  # the panel's field list only needs the dataset
        dataset = digits_copy

    offered = panel._fields(Ctx())
    assert "ground_truth" in offered and "color" in offered
    assert "bias_aligned" not in offered and "source_index" not in offered  # a flag and an index are not groups


def test_panel_before_after_with_generated(digits_copy, tmp_path):
    gen = [fo.Sample(filepath=str(tmp_path / f"g{i}.png"), generated=True,
                     ground_truth=fo.Classification(label="0")) for i in range(30)]
    digits_copy.add_samples(gen)
    summary = _call(digits_copy, "on_load", state={"label_field": "ground_truth"})
    assert summary["after"]["counts"]["0"] == summary["before"]["counts"]["0"] + 30
    assert summary["after"]["num_samples"] == summary["before"]["num_samples"] + 30
    traces = _panel_module().summary_bar_traces(summary)
    assert [t["name"] for t in traces] == ["real", "real + generated"]
    assert [t["name"] for t in _panel_module().summary_bar_traces(summary, "after")] == ["real + generated"]


def test_panel_edge_cases(make_dataset, digits_copy):
    ds = make_dataset()
    ds.add_sample(fo.Sample(filepath="/x/1.png"))
    assert _call(ds, "on_load") is None  # no label field: the panel explains what to do
    one = make_dataset()
    one.add_samples([fo.Sample(filepath=f"/x/{i}.png", y=fo.Classification(label="a")) for i in range(3)])
    summary = _call(one, "on_load")
    assert summary["before"]["entropy"] == 0.0 and summary["before"]["counts"] == {"a": 3}
    assert _call(digits_copy, "on_change_view", view=digits_copy.limit(0)) is None


def test_panel_view_change_writes_no_state(digits_copy):
    """The App saves panel state with its spaces, and saving them reloads the page, which dropped the user's
    sidebar filter about 1 s after it was set (#25): a view change writes no state; the numbers still render."""
    state = {"label_field": "ground_truth", "attribute_field": None}
    ctx = {"dataset": digits_copy.name, "view": digits_copy.match_tags("train"),
           "params": {"__method__": "on_change_view", "panel_id": "test-panel", "panel_state": state}}
    result = foo.execute_operator(PANEL, ctx=ctx)
    assert result.error is None, result.error
    assert result.result["before"]["num_samples"] == len(digits_copy.match_tags("train"))
    requests = result.executor._requests
    assert [r.params["state"] for r in requests if r.operator_uri == "patch_panel_state"] == []
    shown = [r.params["output"] for r in requests if r.operator_uri == "show_panel_output"]
    assert shown and "numbers" in str(shown[0]) and f"| {len(digits_copy.match_tags('train'))} |" in str(shown[0])


def test_panel_last_evaluation_is_the_newest_run_not_the_alphabetically_last(digits_copy):
    """The panel showed pred_vanilla_eval after pred_jtt_eval ran (alphabetical order, #25 item 7)."""
    from fairbalance import evaluate_classifier

    labels = digits_copy.values("ground_truth.label")
    digits_copy.set_values("pred", [fo.Classification(label=v) for v in labels])
    evaluate_classifier(digits_copy, "pred", "ground_truth", attribute_field="color", run_key="pred_vanilla_eval")
    digits_copy.set_values("pred", [fo.Classification(label="0") for _ in labels])  # worse: another accuracy
    evaluate_classifier(digits_copy, "pred", "ground_truth", attribute_field="color", run_key="pred_jtt_eval")
    summary = _call(digits_copy, "on_load", state={"label_field": "ground_truth"})
    assert summary["worst_groups"]["run_key"] == "pred_jtt_eval" and summary["worst_groups"]["accuracy"] < 1


def test_panel_heatmaps_real_and_generated_with_counts_and_cell_click(digits_copy, tmp_path):
    """The repair shows in the panel: real and real + generated heat maps, counts in the tooltips, and a cell
    click filters to that cell (#25 item 8)."""
    gen = [fo.Sample(filepath=str(tmp_path / f"g{i}.png"), generated=True, ground_truth=fo.Classification(label="0"),
                     color=fo.Classification(label="green")) for i in range(5)]
    digits_copy.add_samples(gen)
    ctx = {"dataset": digits_copy.name, "params": {"__method__": "on_change_attribute", "panel_id": "test-panel",
                                                   "panel_state": {"label_field": "ground_truth"}, "value": "color"}}
    result = foo.execute_operator(PANEL, ctx=ctx)
    assert result.error is None, result.error
    real, both = result.result["heatmap"], result.result["heatmap_after"]
    row, col = real["y"].index("0"), real["x"].index("green")
    assert both["counts"][both["y"].index("0")][both["x"].index("green")] == real["counts"][row][col] + 5
    output = str([r.params["output"] for r in result.executor._requests if r.operator_uri == "show_panel_output"])
    assert "purity_after" in output and "customdata" in output and "samples (%{z:.0%} of the group)" in output

    clicked = _call(digits_copy, "on_click_cell", state={"label_field": "ground_truth", "attribute_field": "color"},
                    x="green", y="0")
    cell = digits_copy.match({"ground_truth.label": "0", "color.label": "green"})
    assert clicked == {"filtered_to": "0 x green", "num_samples": len(cell)} and len(cell) >= 5


def test_panel_bar_click_keeps_its_selection_in_the_state(digits_copy):
    """The click's render must not reset the selection it just made (the App's view changes only after it)."""
    ctx = {"dataset": digits_copy.name, "params": {"__method__": "on_click_bar", "panel_id": "test-panel",
                                                   "panel_state": {"label_field": "ground_truth"}, "x": "3"}}
    result = foo.execute_operator(PANEL, ctx=ctx)
    assert result.error is None, result.error
    patches = [r.params["state"] for r in result.executor._requests if r.operator_uri == "patch_panel_state"]
    assert patches == [{"filtered_to": "3"}]


def test_panel_counts_generated_samples_by_the_cluster_their_features_are_nearest_to(make_dataset):
    """#27 item 8: as the gate, the panel's real + generated numbers count a generated sample in the cluster whose
    centre its own features are nearest to, not the one it was planned for, and say which they used."""
    import numpy as np

    from fairbalance import compute_pseudo_labels

    ds = make_dataset()
    rng = np.random.default_rng(0)
    centres = [np.zeros(4), np.full(4, 10.0)]
    ds.add_samples([fo.Sample(filepath=f"/x/r{i}.png", sa_features=centres[i % 2] + rng.normal(0, 0.1, 4),
                              color=fo.Classification(label="red")) for i in range(12)])
    compute_pseudo_labels(ds, "sa_features", "sa_cluster", method="kmeans", num_clusters=2)
    real = ds.count_values("sa_cluster.label")
    assert sorted(real.values()) == [6, 6]
    a, b = sorted(real)
    near_a = ds.match(F("sa_cluster.label") == a).first()["sa_features"]
    ds.add_samples([fo.Sample(filepath=f"/x/g{i}.png", generated=True, sa_features=near_a,
                              sa_cluster=fo.Classification(label=b),  # planned: b; the image came out like a
                              color=fo.Classification(label="green")) for i in range(3)])
    ctx = {"dataset": ds.name, "params": {"__method__": "on_change_attribute", "panel_id": "test-panel",
                                          "panel_state": {"label_field": "sa_cluster"}, "value": "color"}}
    result = foo.execute_operator(PANEL, ctx=ctx)
    assert result.error is None, result.error
    summary = result.result
    assert summary["before"]["counts"] == {a: 6, b: 6}
    assert summary["after"]["counts"] == {a: 9, b: 6}  # by the planned cluster it would be 6 / 9
    both = summary["heatmap_after"]
    assert both["counts"][both["y"].index(a)][both["x"].index("green")] == 3
    assert both["counts"][both["y"].index(b)][both["x"].index("green")] == 0
    assert summary["generated_assigned"] and "3 differ from the planned one" in summary["generated_counted_by"]
    output = str([r.params["output"] for r in result.executor._requests if r.operator_uri == "show_panel_output"])
    assert "Generated samples counted by the cluster their features are nearest to" in output
    # without features (the cached summary is not reused: the samples changed), the planned cluster, and it says so
    ds.match(F("generated") == True).set_values("sa_features", [None] * 3)  # noqa: E712
    planned = _call(ds, "on_load", state={"label_field": "sa_cluster"})
    assert planned["after"]["counts"] == {a: 6, b: 9} and not planned["generated_assigned"]
    assert "without features by their planned 'sa_cluster'" in planned["generated_counted_by"]
    # a field no pseudo-label run wrote has no cluster centres: the planned value
    plain = _call(ds, "on_load", state={"label_field": "color"})
    assert plain["after"]["counts"] == {"green": 3, "red": 12}
    assert "not a pseudo-label field" in plain["generated_counted_by"]
