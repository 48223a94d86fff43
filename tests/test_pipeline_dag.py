"""Pipelines as a DAG (issue 27): a 9-step file with data, repair, training, gate and export steps runs, reruns
as a no-op, reruns exactly the stale suffix after an edit, resumes after kill -9, and keeps its identity
(``name`` + dataset) across copies; ``--from``, ``--only``, ``KEY=VALUE`` overrides and ``status``."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import fiftyone as fo
import pytest

from fairbalance.core import runs
from fairbalance.ops import cli
from fairbalance.ops.export import TorchImageDataset

STEPS = ["colored-digits", "compute-hardness-tags", "train-conditional-diffusion", "generate-balanced",
         "train-classifier", "apply-classifier", "evaluate-classifier", "check", "export"]


def pipeline_text(name: str, root, classifier_epochs: int = 1, pipeline_name: str | None = "repair") -> str:
    return (f"name: {pipeline_name}\n" if pipeline_name else "") + textwrap.dedent(f"""\
        dataset: {name}
        steps:
          - colored-digits: {{output_dir: {root}/digits, num_classes: 3, train_per_class: 10, test_per_class: 3,
                              image_size: 16, conflict_ratio: 0.1}}
          - compute-hardness-tags: {{view: train, epochs: 1, batch_size: 32, top_k: 4}}
          - train-conditional-diffusion:
              view: train
              label_field: ground_truth
              attribute_field: color
              output_dir: {root}/model
              epochs: 1
              image_size: 8
              block_out_channels: [16, 32]
              batch_size: 32
              run_key: cd
          - generate-balanced: {{view: train, label_field: ground_truth, model_run: cd, mode: cells, per_cell: 4,
                                 num_inference_steps: 2, output_dir: {root}/generated, run_key: gen}}
          - train-classifier:
              view: train
              method: jtt
              hard_tag: bias_conflicting
              epochs: {classifier_epochs}
              batch_size: 32
              run_key: jtt
              val_view: test
          - apply-classifier: {{view: test, classifier_run: jtt, predictions_field: jtt_predictions}}
          - evaluate-classifier: {{view: test, predictions_field: jtt_predictions, attribute_field: color,
                                   aligned_field: bias_aligned, run_key: jtt_eval}}
          - check: {{label_field: ground_truth, min_normalized_entropy: 0.5}}
          - export: {{output_dir: {root}/export, exclude_tags: [test]}}
        """)


def run_json(capsys, *args) -> tuple[int, dict]:
    code = cli.main(["run", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else {"stderr": captured.err[-3000:]})


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_nine_step_pipeline_runs_reruns_stale_suffix_resumes_and_keeps_its_identity(tmp_path, capsys):
    name = f"fb-dag-{os.getpid()}"
    path = tmp_path / "repair.yml"
    path.write_text(pipeline_text(name, tmp_path))
    try:
        code, first = run_json(capsys, path)
        assert code == 0 and first["ran"] == list(range(9)), first
        ds = fo.load_dataset(name)
        for key in ("hardness", "cd", "gen", "jtt", "jtt_predictions", "jtt_eval", "repair"):
            assert ds.has_run(key), key
        num_generated = len(ds.match_tags("generated"))
        assert num_generated > 0
        # the export: generated rows carry their provenance; runs.json the generation run, its model fingerprint
        with open(tmp_path / "export" / "manifest.csv") as f:
            rows = list(csv.DictReader(f))
        gen_rows = [r for r in rows if r["generated"] == "True"]
        assert len(gen_rows) == num_generated and all(r["cell"] and r["seed"] and r["generation_run"] == "gen"
                                                      for r in gen_rows)
        assert {(r["width"], r["height"]) for r in gen_rows} == {("8", "8")}
        record = json.loads((tmp_path / "export" / "runs.json").read_text())
        gen_run = record["runs"]["gen"]
        assert gen_run["config"]["seed"] == 0 and gen_run["model"]["folder"] == str(tmp_path / "model")
        assert re.fullmatch(r"[0-9a-f]{40}", gen_run["model"]["sha1"]) and gen_run["model"]["content_hashed"]
        with pytest.warns(UserWarning, match="resized"):
            trainer = TorchImageDataset.from_manifest(str(tmp_path / "export" / "manifest.csv"))
        assert trainer[0][0].shape == (3, 16, 16) and len(trainer) == len(rows)

        # a rerun is a no-op
        code, again = run_json(capsys, path)
        assert code == 0 and again["ran"] == [] and again["skipped"] == list(range(9))
        assert cli.main(["status", str(path)]) == 0
        assert capsys.readouterr().out.count(": done") == 9

        # an override (Hydra style) of step 5 reruns exactly it and what is downstream; owned runs are replaced
        stamp = str(ds.get_run_info("hardness").timestamp)
        code, edited = run_json(capsys, path, "train-classifier.epochs=2")
        assert code == 0 and edited["ran"] == [4, 5, 6, 7, 8] and edited["skipped"] == [0, 1, 2, 3], edited
        ds.reload()
        assert runs.get_run_config(ds, "jtt")["epochs"] == 2 and str(ds.get_run_info("hardness").timestamp) == stamp
        # the file itself (epochs 1) is now stale from step 5 on
        assert cli.main(["status", str(path), "--json"]) == 0
        states = [s["state"] for s in json.loads(capsys.readouterr().out)["steps"]]
        assert states == ["done"] * 4 + ["stale"] * 5

        # an edit, run in a process killed (kill -9) during the stale suffix; the rerun finishes the suffix only
        path.write_text(pipeline_text(name, tmp_path, classifier_epochs=3))
        proc = subprocess.Popen([sys.executable, "-m", "fairbalance", "run", str(path)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        try:
            deadline = time.time() + 300
            for line in proc.stdout:
                if "train-classifier" in line and "running" in line:
                    break
                assert time.time() < deadline
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        code, resumed = run_json(capsys, path)
        k = resumed["ran"][0] if resumed["ran"] else 9
        assert code == 0 and 4 <= k and resumed["ran"] == list(range(k, 9)) and resumed["skipped"] == list(range(k))
        ds.reload()
        assert runs.get_run_config(ds, "jtt")["epochs"] == 3 and len(ds.match_tags("generated")) == num_generated
        code, again = run_json(capsys, path)
        assert again["ran"] == []

        # --only and --from
        code, only = run_json(capsys, path, "--only", "evaluate-classifier")
        assert code == 0 and only["ran"] == [6]
        assert cli.main(["status", str(path), "--json"]) == 0
        states = [s["state"] for s in json.loads(capsys.readouterr().out)["steps"]]
        assert states == ["done"] * 7 + ["stale"] * 2  # the gate and the export read what evaluate-classifier wrote
        code, rest = run_json(capsys, path, "--from", "check")
        assert code == 0 and rest["ran"] == [7, 8]

        # identity: a copy with the same name, and a copy without a name, both find the work done
        copy = tmp_path / "copy" / "repair-copy.yml"
        copy.parent.mkdir()
        shutil.copy(path, copy)
        code, same = run_json(capsys, copy)
        assert code == 0 and same["ran"] == []
        copy.write_text(pipeline_text(name, tmp_path, classifier_epochs=3, pipeline_name=None))
        code, adopted = run_json(capsys, copy)
        assert code == 0 and adopted["ran"] == [] and adopted["name"] == "pipeline_repair_copy", adopted
        assert cli.main(["status", str(copy)]) == 0 and capsys.readouterr().out.count(": done") == 9

        # a gate that fails stops the pipeline with exit code 1; --dry-run says so up front for bad values
        strict = tmp_path / "strict.yml"
        strict.write_text(pipeline_text(name, tmp_path, classifier_epochs=3).replace(
            "check: {label_field: ground_truth, min_normalized_entropy: 0.5}",
            "check: {label_field: bias_aligned, min_normalized_entropy: 0.99}"))
        code, gate = run_json(capsys, strict)
        assert code == 1 and gate["gate_failed"] == 7 and 8 not in gate["ran"]
        bad = tmp_path / "bad.yml"
        bad.write_text(pipeline_text(name, tmp_path).replace("exclude_tags: [test]", "format: zip"))
        assert cli.main(["run", str(bad), "--dry-run"]) == 2
        assert f"{bad}, line 31" in capsys.readouterr().err
    finally:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)
