"""Progress of immediate runs: a heavy operator run from the App streams its steps and time left, then its result.

FiftyOne shows ``ctx.set_progress`` only for scheduled (delegated) runs; the
App shows progress during an immediate run only for generator operators
yielding ``set_progress`` (see ``operators/_progress.streams_progress``). These
tests run the real operators through a real ``ExecutionContext`` and through
the App server's generator endpoint; tests/test_browser_progress.py sees the
label in Chromium.
"""

import json
import re
import time
import urllib.request

import fiftyone as fo
import fiftyone.operators as foo
import pytest
from fiftyone.operators.executor import ExecutionContext, Executor

from test_app_server import PLUGIN, serve_app

STEPS = re.compile(r"^[A-Z][\w ]+: [\d,]+ of [\d,]+ \(\d+%\)")


def _operators():
    from fiftyone.operators.registry import OperatorRegistry

    return [op for op in OperatorRegistry().list_operators() if op.uri.startswith(PLUGIN + "/")]


def test_every_heavy_operator_streams_its_progress():
    """Generator config and the streaming ``execute`` go together (either alone loses the App's result), and every
    operator that can be scheduled (the heavy ones) streams."""
    ops = _operators()
    assert len(ops) > 15
    for op in ops:
        streams = getattr(type(op).execute, "streams_progress", False)
        assert op.config.execute_as_generator == streams, op.uri
        assert streams == bool(op.config.allow_delegated_execution), op.uri


def test_progress_label_says_the_time_left_without_a_terminal():
    """FiftyOne's bar is quiet without a terminal (the App, a worker) and then has no ETA: the label computes the
    time left from the elapsed time."""
    import fiftyone.core.utils as fou

    import operators._common as common  # the plugin's own module, as FiftyOne loads it

    seen = []
    ctx = ExecutionContext({"params": {}}, set_progress=lambda _id, p: seen.append(p.label),
                           delegated_operation_id="op")
    with fou.ProgressBar(total=6, progress=common.progress_callback(ctx, "Training steps")) as pb:
        for _ in range(6):
            time.sleep(0.3)
            pb.update()
    assert len(seen) >= 2 and seen[-1] == "Training steps: 6 of 6 (100%)"
    assert all(re.fullmatch(r"Training steps: \d of 6 \(\d+%\), about \d s left", s) for s in seen[:-1]), seen


def _run(uri, params, dataset_name=None, progress_after=None, monkeypatch=None):
    """The operator's ``execute`` as the App's generator endpoint calls it: a real context naming the operator.
    ``progress_after``: the seconds a run goes before its progress is drawn (0: always)."""
    from fiftyone.operators.registry import OperatorRegistry

    op = OperatorRegistry().get_operator(f"{PLUGIN}/{uri}")
    if progress_after is not None:
        monkeypatch.setitem(type(op).execute.__globals__, "PROGRESS_AFTER", progress_after)
    ctx = ExecutionContext(request_params={"operator_uri": op.uri, "dataset_name": dataset_name, "params": params},
                           executor=Executor(), operator_uri=op.uri)
    return [m.to_json() for m in op.execute(ctx)]


def _triggered(lines, name=None):
    return [m["body"]["params"] if name else m["body"]["operator_uri"] for m in lines
            if m.get("cls") == "InvocationRequest" and (name is None or m["body"]["operator_uri"] == name)]


def test_immediate_run_yields_steps_then_triggers_then_result(monkeypatch):
    name = "fb-progress-stream"
    try:
        lines = _run("create_colored_digits", {"name": name, "train_per_class": 6, "test_per_class": 2,
                                               "num_classes": 3, "image_size": 8, "overwrite": True},
                     progress_after=0, monkeypatch=monkeypatch)
        progress = _triggered(lines, "set_progress")
        assert progress and all(STEPS.match(p["label"]) for p in progress), progress
        assert progress[-1]["label"].startswith("Writing images: 24 of 24 (100%)") and progress[-1]["progress"] == 1
        # then what the run triggered (from the home page: the new dataset opened), then the result (no result
        # dialog from the home page: the usual result message, which the App does not show)
        assert _triggered(lines)[len(progress):] == ["open_dataset"]
        assert _triggered(lines, "open_dataset") == [{"dataset": name}]
        assert lines[-1]["cls"] == "ExecutionResult" and lines[-1]["body"]["num_samples"] == 24
        # what was made is said once the dataset's page is up (the App runs show_created_notice on opening it):
        # a notification sent with the open went with the home page before the dataset showed
        said = f"Colored Digits '{name}' created: 18 train and 6 test samples"
        notice = _notice(name)
        assert len(notice) == 1 and notice[0]["message"].startswith(said) and notice[0]["variant"] == "success"
        assert _notice(name) == []  # once
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


def _notice(dataset_name):
    """The notifications the App gets when it opens ``dataset_name`` (FiftyOne runs the plugin's operators marked
    ``on_dataset_open`` then)."""
    from fiftyone.operators.registry import OperatorRegistry

    opening = [op for op in OperatorRegistry().list_operators()
               if op.plugin_name == PLUGIN and op.config.on_dataset_open]
    assert [op.name for op in opening] == ["show_created_notice"]
    res = foo.execute_operator(opening[0].uri, ctx={"dataset": dataset_name, "params": {}})
    assert res.error is None, res.error
    return [m.params for m in res.executor._requests if m.operator_uri == "notify"] if res.executor else []


def test_a_dataset_opened_in_the_app_is_told_nothing_and_gets_no_store(digits_copy):
    """Opening any other dataset: no notification, no execution store left on it (one read)."""
    from fiftyone.operators.store import ExecutionStoreService

    assert _notice(digits_copy.name) == []
    assert not ExecutionStoreService(dataset_id=digits_copy._doc.id).has_store("fairbalance_notices")


def test_progress_dialog_then_shows_the_result(digits_copy, monkeypatch):
    """Once progress is drawn (FiftyOne's own dialog), that dialog shows the result: the operator's result view
    and its values; the "Executing..." dialog gets no result and closes."""
    lines = _run("compute_hardness_tags", {"label_field": "ground_truth", "epochs": 2, "top_k": 5, "seed": 0},
                 digits_copy.name, progress_after=0, monkeypatch=monkeypatch)
    progress = _triggered(lines, "set_progress")
    assert progress and progress[-1]["label"].startswith("Training the biased classifier: 2 of 2 (100%)")
    assert _triggered(lines)[len(progress):] == ["reload_samples", "show_output"]  # the user's view kept
    shown = _triggered(lines, "show_output")[0]
    assert shown["results"]["tagged_of"] == "5 of 400 samples of the view"
    assert shown["outputs"]["view"]["label"] == "Hardness tags computed"
    # that dialog shows no view label: the title is the result's first line
    assert list(shown["outputs"]["type"]["properties"])[0] == "result_title" and "tagged_of" in \
        shown["outputs"]["type"]["properties"]
    assert shown["results"]["result_title"] == "**Hardness tags computed**"
    assert not [m for m in lines if m.get("cls") == "ExecutionResult"]


def test_quick_run_shows_only_its_result(digits_copy, monkeypatch):
    lines = _run("compute_hardness_tags", {"label_field": "ground_truth", "epochs": 1, "top_k": 5, "seed": 0},
                 digits_copy.name, progress_after=3600, monkeypatch=monkeypatch)
    assert _triggered(lines) == ["reload_samples"]
    assert lines[-1]["cls"] == "ExecutionResult" and lines[-1]["body"]["num_tagged"] == 5


def test_immediate_run_failure_is_an_error_in_words(digits_copy, monkeypatch):
    lines = _run("train_classifier", {"label_field": "no_such_field", "epochs": 1}, digits_copy.name,
                 progress_after=0, monkeypatch=monkeypatch)
    assert set(lines[-1]) == {"error", "error_message"}
    assert "no_such_field" in lines[-1]["error"] and "Traceback" not in lines[-1]["error"]
    assert not digits_copy.has_run("classifier")


def test_sdk_call_still_returns_the_result(digits_copy):
    """``execute_operator`` (scripts, tests) does not name the operator in its request: a plain result, as before."""
    import fiftyone.operators as foo

    res = foo.execute_operator(f"{PLUGIN}/compute_hardness_tags", ctx={
        "dataset": digits_copy, "params": {"label_field": "ground_truth", "epochs": 1, "seed": 0}})
    assert isinstance(res.result, dict) and res.result["num_tagged"] >= 0


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """A server of this module's own, as before the session's (tests/conftest.py): the stream is timed on a server
    that has not trained yet (in the session's, after the browser tests, 60 epochs gave a single progress label)."""
    yield from serve_app(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_app_server_streams_progress_before_the_result(app_server, digits_copy):
    """The App's own endpoint: set_progress lines with steps arrive while the run goes on, the result last."""
    payload = {"operator_uri": f"{PLUGIN}/train_classifier", "dataset_name": digits_copy.name, "view": [],
               "params": {"label_field": "ground_truth", "epochs": 600, "seed": 0, "run_key": "streamed"}}
    # 600 epochs (~3 s of training): with 60, this test run alone, its two labels came within 0.1 s of each
    # other, too close to tell streaming from a batch at the end, and the check below failed (at efc2dbd too)
    req = urllib.request.Request(f"{app_server}/operators/execute/generator", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    start, seen = time.time(), []
    with urllib.request.urlopen(req, timeout=240) as r:
        for raw in r:
            seen.append((time.time() - start, json.loads(raw)))
    labels = [(t, m["body"]["params"]["label"]) for t, m in seen if m.get("cls") == "InvocationRequest"
              and m["body"]["operator_uri"] == "set_progress"]
    t_result, result = seen[-1][0], seen[-1][1]["body"]
    assert result.get("operator_uri") == "show_output", seen[-3:]  # not an error message
    assert result["params"]["results"]["run_key"] == "streamed", result
    assert len(labels) >= 2 and all(STEPS.match(label) for _, label in labels), labels
    assert labels[0][0] < labels[-1][0] - 0.2 < t_result  # streamed as the run goes, not all at the end
    assert any("left" in label for _, label in labels), labels  # the time left, once a rate is known
    digits_copy.reload()
    assert digits_copy.has_run("streamed")
