"""The command line end to end, in subprocesses against the test MongoDB: pipeline, gate, export, bad input."""

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time

import fiftyone as fo
import numpy as np
import pytest

import fairbalance as fb
from fairbalance import claims, cli, runs
from fairbalance.export import TorchImageDataset, export_samples
from fairbalance.gate import check_balance
from fairbalance.validation import FairBalanceError


def fairbalance(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "fairbalance", *map(str, args)], capture_output=True, text=True,
                         timeout=600)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def digits():
    ds = fb.colored_digits("fb-cli", num_classes=3, train_per_class=20, test_per_class=5, conflict_ratio=0.05,
                           image_size=16, persistent=True, overwrite=True)
    yield ds
    ds.delete()


PIPELINE = """\
dataset: {name}
view: train
steps:
  - compute-hardness-tags: {{epochs: 2, batch_size: 32, top_k: 6}}
  - train-classifier:
      method: jtt
      hard_tag: bias_conflicting
      epochs: 2
      run_key: jtt
      val_view: test
  - apply-classifier: {{view: test, classifier_run: jtt, predictions_field: jtt_predictions}}
  - evaluate-classifier:
      view: test
      predictions_field: jtt_predictions
      attribute_field: color
      aligned_field: bias_aligned
      run_key: jtt_eval
"""


def test_pipeline_runs_every_step_and_a_rerun_is_a_no_op(digits, tmp_path):
    path = tmp_path / "repair.yml"
    path.write_text(PIPELINE.format(name=digits.name))
    plan = fairbalance("run", path, "--dry-run")
    assert plan.stdout.count("would run") == 4 and not digits.has_run("jtt")
    first = fairbalance("run", path)
    assert first.stdout.count(": finished") == 4, first.stdout
    digits.reload()
    for key in ("hardness", "jtt", "jtt_predictions", "jtt_eval", "pipeline_repair"):
        assert digits.has_run(key), key
    assert digits.count("jtt_predictions") == len(digits.match_tags("test"))
    ev = runs.load_run_results(digits, "jtt_eval")
    assert 0 <= ev["worst_group_accuracy"] <= ev["accuracy"] <= 1
    again = fairbalance("run", path)
    assert again.stdout.count("skipped") == 4 and "running" not in again.stdout
    # the gate reads the evaluation run: worst-group accuracy above 0 passes, above 1 cannot
    ok = fairbalance("check", digits.name, "--view", "test", "--field", "ground_truth", "--min-normalized-entropy",
                     0.99, "--min-worst-group-accuracy", 0.0, "--evaluation-run", "jtt_eval", "--report-dir",
                     tmp_path / "report")
    assert "PASSED" in ok.stdout and (tmp_path / "report" / "counts.png").stat().st_size > 1000
    assert "worst_group_accuracy" in (tmp_path / "report" / "report.md").read_text()


def test_killed_pipeline_resumes_the_interrupted_step(digits, tmp_path):
    model = tmp_path / "model"
    path = tmp_path / "gen.yml"
    path.write_text(textwrap.dedent(f"""\
        dataset: {digits.name}
        view: train
        steps:
          - balance-report: {{label_field: color, run_key: before}}
          - train-conditional-diffusion:
              label_field: color
              output_dir: {model}
              epochs: 6
              block_out_channels: [16, 32]
              checkpoint_every: 1
              run_key: cd
        """))
    proc = subprocess.Popen([sys.executable, "-m", "fairbalance", "run", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (model / "training_state" / "latest.json").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.stderr else ""
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    # a checkpoint the kill cut short (as if it died while saving): never read, removed by the next checkpoint
    half_written = model / "training_state" / "step-000000999"
    half_written.mkdir(exist_ok=True)
    (half_written / "model.safetensors").write_bytes(b"\x00" * 7)
    digits.reload()
    assert digits.has_run("before") and not digits.has_run("cd")  # step 1 done, step 2 interrupted
    out = fairbalance("run", path)
    assert "balance-report (line 4): done before" in out.stdout and out.stdout.count(": finished") == 1
    digits.reload()
    res = runs.load_run_results(digits, "cd")
    assert 0 < res["resumed_from_step"] < 6 and res["steps"] == 6  # 60 train images, batches of 64
    assert sorted(p.name for p in (model / "training_state").glob("step-*")) == ["step-000000006"]
    assert not claims.list_claims()


def test_gate_passes_balanced_and_fails_imbalanced_fields(digits, tmp_path):
    balanced = fairbalance("check", digits.name, "--view", "train", "--field", "ground_truth",
                           "--min-normalized-entropy", 0.99, "--max-imbalance-ratio", 1.01)
    assert "PASSED" in balanced.stdout
    skewed = fairbalance("check", digits.name, "--view", "train", "--field", "bias_aligned",
                         "--min-normalized-entropy", 0.9, "--json", check=False)
    assert skewed.returncode == 1
    import json

    verdict = json.loads(skewed.stdout)
    assert verdict["passed"] is False and verdict["checks"][0]["value"] < 0.9
    sdk = check_balance(digits.match_tags("train"), "bias_aligned", min_normalized_entropy=0.9)
    assert sdk.checks[0].value == pytest.approx(verdict["checks"][0]["value"]) and not sdk.passed
    for bad in ([], ["--min-normalized-entropy", "1.5"], ["--max-imbalance-ratio", "0.5"],
                ["--min-worst-group-accuracy", "0.5"], ["--min-worst-group-accuracy", "0.5", "--evaluation-run", "x"]):
        assert cli.main(["check", digits.name, "--field", "ground_truth", *bad]) == 2, bad  # the same code, in process


def test_export_round_trips_with_a_provenance_manifest(digits, tmp_path):
    out = tmp_path / "tree"
    res = fairbalance("export", digits.name, "--view", "train", "--output", out, "--json")
    import json

    summary = json.loads(res.stdout)
    train = digits.match_tags("train")
    assert summary["num_samples"] == len(train) and summary["classes"] == ["0", "1", "2"]
    back = fo.Dataset.from_dir(str(out), fo.types.ImageClassificationDirectoryTree)
    try:
        assert back.count_values("ground_truth.label") == train.count_values("ground_truth.label")
    finally:
        back.delete()
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(train) and all(os.path.isfile(r["filepath"]) for r in rows)
    assert {r["filepath"].split(os.sep)[-2] for r in rows} == {"0", "1", "2"}  # copied into class folders
    assert {r["generated"] for r in rows} == {"False"} and {r["weight"] for r in rows} == {"1.0"}
    refused = fairbalance("export", digits.name, "--output", out, check=False)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    # in Python: the csv manifest over the media in place, excluding a tag; and the torch dataset
    digits.match_tags("test").limit(3).tag_samples("low_quality")
    try:
        csv_res = export_samples(digits, str(tmp_path / "csv"), format="csv-manifest", exclude_tags=["low_quality"])
        assert csv_res.num_samples == len(digits) - 3 and csv_res.num_excluded == 3
        ds = TorchImageDataset(digits.match_tags("train"), weights_field=None)
        x, y, w = ds[0]
        assert x.shape == (3, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1 and w == 1.0
        assert ds.classes == ["0", "1", "2"] and np.bincount(ds.targets).tolist() == [20, 20, 20]
        with pytest.raises(FairBalanceError, match="format must be"):
            export_samples(digits, str(tmp_path / "x"), format="zip")
    finally:
        digits.untag_samples("low_quality")


def test_bad_pipelines_and_names_fail_with_exit_code_2(digits, tmp_path, capsys):
    cases = {
        "unknown step": (f"dataset: {digits.name}\nsteps:\n  - compute-everything: {{}}\n", "line 3"),
        "unknown parameter": (f"dataset: {digits.name}\nsteps:\n  - compute-hardness-tags:\n      top_kk: 3\n",
                              "line 4"),
        "unknown key": (f"dataset: {digits.name}\nstep: []\n", "line 2"),
        "missing dataset": ("dataset: no-such-dataset\nsteps:\n  - balance-report: {label_field: color}\n",
                            "no dataset named"),
        "missing view": (f"dataset: {digits.name}\nview: nope\nsteps:\n  - balance-report: {{label_field: color}}\n",
                         "neither a saved view nor a tag"),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yml"
        path.write_text(text)
        assert cli.main(["run", str(path)]) == 2, name
        assert message in capsys.readouterr().err, name
    assert cli.main(["balance-report", digits.name, "--label-field", "color", "--view", "nope"]) == 2
    assert cli.main(["balance-report", "no-such-dataset", "--label-field", "color"]) == 2
    assert cli.main(["balance-report", digits.name, "--label-field", "color", "--attribute-field",
                     "ground_truth"]) == 0
    assert "color x ground_truth" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: an unknown option
        cli.main(["compute-hardness-tags", digits.name, "--top-kk", "3"])


def test_pipeline_queued_for_delegated_workers(digits, tmp_path):
    import fiftyone.operators.delegated as food

    path = tmp_path / "queued.yml"
    path.write_text(f"dataset: {digits.name}\nsteps:\n  - balance-report: {{label_field: color, run_key: queued}}\n")
    assert cli.main(["run", str(path), "--queue"]) == 0
    svc = food.DelegatedOperationService()
    uri = "@fairbalance/fairbalance/run_pipeline"
    queued = svc.list_operations(operator=uri, dataset_name=digits.name)
    assert len(queued) == 1 and str(queued[0].run_state).lower().endswith("queued")
    assert not digits.has_run("queued")  # nothing ran here: a worker runs it
    svc.execute_queued_operations(operator=uri, limit=1)  # what `fiftyone delegated launch` does
    digits.reload()
    assert digits.has_run("queued") and digits.has_run("pipeline_queued")
