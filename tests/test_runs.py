import fiftyone as fo
import pytest

from fairbalance.core import runs, writeback
from fairbalance.core.validation import FairBalanceError


def _write(samples, field, value):
    ids = samples.values("id")
    return lambda: writeback.set_values_by_id(samples, {field: {i: value for i in ids}})


def test_run_records_config_fields_and_results(digits_copy):
    run = runs.prepare(digits_copy, "scores", "demo_method", {"model": "m", "seed": 7, "k": 3}, ["score"])
    run.write(_write(digits_copy, "score", 1.5))
    run.save_results({"mean": 1.5, "per_class": {"0": 1}})
    cfg = runs.get_run_config(digits_copy, "scores")
    assert cfg["method"] == "fairbalance.demo_method"
    assert cfg["model"] == "m" and cfg["seed"] == 7 and cfg["k"] == 3
    assert cfg["fields_written"] == ["score"]
    assert runs.load_run_results(digits_copy, "scores") == {"mean": 1.5, "per_class": {"0": 1}}
    assert runs.list_runs(digits_copy) == ["scores"]
    assert runs.list_runs(digits_copy, "other") == []
    assert digits_copy.count_values("score") == {1.5: len(digits_copy)}


def test_same_key_refused_then_replaced_not_mixed(digits_copy):
    runs.prepare(digits_copy, "r", "m", {"v": 1}, ["old_field"]).write(_write(digits_copy, "old_field", 1))
    with pytest.raises(FairBalanceError, match="already exists"):
        runs.prepare(digits_copy, "r", "m", {"v": 2}, ["new_field"])
    run = runs.prepare(digits_copy, "r", "m", {"v": 2}, ["new_field"], overwrite=True)
    assert digits_copy.has_field("old_field")  # nothing removed before the new values exist
    run.write(_write(digits_copy, "new_field", 2))
    assert not digits_copy.has_field("old_field")
    assert runs.get_run_config(digits_copy, "r")["v"] == 2
    with pytest.raises(FairBalanceError, match="was made by"):
        runs.prepare(digits_copy, "r", "another_method", {}, ["x"], overwrite=True)


def test_rerun_same_field_is_idempotent(digits_copy):
    for value in (1, 2):
        runs.prepare(digits_copy, "r", "m", {}, ["f"], overwrite=True).write(_write(digits_copy, "f", value))
    assert digits_copy.count_values("f") == {2: len(digits_copy)}
    assert len(runs.list_runs(digits_copy)) == 1


def test_fields_of_others_are_never_replaced(digits_copy):
    for overwrite in (False, True):
        with pytest.raises(FairBalanceError, match="not written by fairbalance"):
            runs.prepare(digits_copy, "r", "m", {}, ["ground_truth"], overwrite=overwrite)
    runs.prepare(digits_copy, "a", "m", {}, ["f"]).write(_write(digits_copy, "f", 1))
    for overwrite in (False, True):
        with pytest.raises(FairBalanceError, match="written by run 'a'"):
            runs.prepare(digits_copy, "b", "m", {}, ["f"], overwrite=overwrite)
    assert digits_copy.count_values("f") == {1: len(digits_copy)}
    runs.prepare(digits_copy, "a", "m", {}, ["f"], overwrite=True).write(_write(digits_copy, "f", 2))
    assert digits_copy.count_values("f") == {2: len(digits_copy)}


def test_resumable_runs_rerun_with_the_same_config_only(digits_copy):
    runs.prepare(digits_copy, "g", "gen", {"model": "m", "epochs": 1}, []).write(lambda: None)
    again = runs.prepare(digits_copy, "g", "gen", {"model": "m", "epochs": 1}, [], rerun_same_config=True)
    assert again.resumed
    assert runs.prepare(digits_copy, "g", "gen", {"model": "m", "epochs": 5}, [], rerun_same_config=True,
                        ignore_for_rerun=("epochs",)).resumed
    with pytest.raises(FairBalanceError, match="differs in: model"):
        runs.prepare(digits_copy, "g", "gen", {"model": "other", "epochs": 1}, [], rerun_same_config=True)
    with pytest.raises(FairBalanceError, match="already exists"):
        runs.prepare(digits_copy, "g", "gen", {"model": "m", "epochs": 1}, [])


@pytest.mark.parametrize("key", ["", "1abc", "a-b", "a.b", None])
def test_invalid_run_keys(digits_copy, key):
    with pytest.raises(FairBalanceError):
        runs.prepare(digits_copy, key, "m", {}, [])


@pytest.mark.parametrize("field", ["", "a.b", "_private", "id", "filepath"])
def test_invalid_field_names(digits_copy, field):
    with pytest.raises(FairBalanceError):
        runs.prepare(digits_copy, "r", "m", {}, [field])


def test_delete_run_cleans_up_fields(digits_copy):
    runs.prepare(digits_copy, "r", "m", {}, ["f"]).write(_write(digits_copy, "f", 1))
    runs.delete_run(digits_copy, "r")
    assert not digits_copy.has_field("f") and runs.list_runs(digits_copy) == []


def test_writeback_validates_before_writing(digits_copy):
    ids = digits_copy.values("id")
    partial = {"a": {i: 1 for i in ids}, "b": {i: 2 for i in ids[:-1]}}
    with pytest.raises(FairBalanceError, match="1 sample\\(s\\) missing"):
        writeback.set_values_by_id(digits_copy, partial)
    assert not digits_copy.has_field("a") and not digits_copy.has_field("b")
    extra = {"a": {**{i: 1 for i in ids}, "ffffffffffffffffffffffff": 1}}
    with pytest.raises(FairBalanceError, match="unknown id"):
        writeback.set_values_by_id(digits_copy, extra)
    view = digits_copy.match_tags("test")
    labels = {i: fo.Classification(label="x") for i in view.values("id")}
    writeback.set_values_by_id(view, {"lab": labels})
    assert digits_copy.count_values("lab.label") == {"x": len(view), None: len(digits_copy) - len(view)}


def test_writeback_of_mixed_types_leaves_no_field(digits_copy):
    ids = digits_copy.values("id")
    mixed = {"ok": {i: 1.0 for i in ids}, "bad": {i: (1.0 if j % 2 else "one") for j, i in enumerate(ids)}}
    with pytest.raises(FairBalanceError, match="Could not write 'bad'"):
        writeback.set_values_by_id(digits_copy, mixed)
    assert not digits_copy.has_field("ok") and not digits_copy.has_field("bad")


def test_results_rewritten_by_another_process_are_read_not_a_stale_file(digits_copy):
    """The App server keeps its dataset in memory while a worker or a pipeline process overwrites a run's results
    (FiftyOne then deletes the old GridFS file): reading them must give the new results, not a decode error."""
    import subprocess
    import sys

    runs.prepare(digits_copy, "ev", "m", {}, []).write(lambda: None)
    runs.prepare(digits_copy, "ev", "m", {}, [], overwrite=True).save_results({"accuracy": 0.1})
    assert runs.load_run_results(digits_copy, "ev") == {"accuracy": 0.1}  # this process now holds the run doc
    code = ("import fiftyone as fo; from fairbalance.core import runs; "
            f"ds = fo.load_dataset({digits_copy.name!r}); "
            "runs.prepare(ds, 'ev', 'm', {}, [], overwrite=True).save_results({'accuracy': 0.9})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert runs.load_run_results(digits_copy, "ev") == {"accuracy": 0.9}
