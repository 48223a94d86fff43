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
from fairbalance.core import claims, runs, sharding
from fairbalance.ops import cli
from fairbalance.ops.export import TorchImageDataset, export_samples
from fairbalance.ops.gate import check_balance
from fairbalance.core.validation import FairBalanceError


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


@pytest.mark.slow
@pytest.mark.timeout(600)
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


@pytest.mark.slow
@pytest.mark.timeout(600)
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
              epochs: 60
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
            time.sleep(0.1)
        # killed at its first checkpoints: 60 steps cannot be done by then (6 steps were, on an idle machine)
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
    assert 0 < res["resumed_from_step"] < 60 and res["steps"] == 60  # 60 train images, batches of 64
    assert sorted(p.name for p in (model / "training_state").glob("step-*")) == ["step-000000060"]
    assert not claims.list_claims()


@pytest.mark.slow
@pytest.mark.timeout(300)
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


@pytest.mark.slow
@pytest.mark.timeout(300)
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


# ----------------------------------------------------------------------------- issue 27: pipelines a CI can trust


@pytest.fixture
def small(tmp_path):
    """A fresh 3-class dataset (16 px) per test: real images only."""
    ds = fb.colored_digits(f"fb-cli-small-{os.getpid()}", output_dir=str(tmp_path / "digits"), num_classes=3,
                           train_per_class=4, test_per_class=1, image_size=16, persistent=True, overwrite=True)
    yield ds
    ds.delete()


def _add_generated(ds, folder, n, size, labelled=True, run_key="gen_test"):
    """Generated samples as the generators write them (image files, ``generated``, ``generation`` provenance)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    new = []
    for i in range(n):
        path = os.path.join(folder, f"cell{i % 3}x0_seed0_{i:05d}.png")
        Image.new("RGB", (size, size), (200, (40 * i) % 255, 10)).save(path)
        label = {"ground_truth": fo.Classification(label=str(i % 3))} if labelled else {
            "sa_cluster": fo.Classification(label=str(i % 2))}
        new.append(fo.Sample(filepath=path, tags=["generated"], generated=True, generation={
            "run_key": run_key, "seed": 1000 + i, "cell": f"{i % 3}|red", "model_step": 6,
            "source_filepath": f"/data/src{i}.png"}, **label))
    ds.add_samples(new)


def test_export_readme_command_prints_its_summary(digits, tmp_path, capsys):
    """Item 1: `fairbalance export DATASET --view V --output DIR` (no --json) exits 0 and prints the summary."""
    out = tmp_path / "exported"
    assert cli.main(["export", digits.name, "--view", "train", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "format: image-classification-dir" in printed and f"num_samples: {len(digits.match_tags('train'))}" \
        in printed and (out / "manifest.csv").is_file() and (out / "runs.json").is_file()


def test_export_refuses_to_drop_generated_samples_without_the_label(small, tmp_path, capsys):
    """Item 6: generated samples without ground_truth (the clusters repair) are not dropped silently."""
    _add_generated(small, str(tmp_path / "gen"), 4, 16, labelled=False)
    out = tmp_path / "out"
    with pytest.raises(FairBalanceError, match=r"4 generated sample\(s\) \(run\(s\) \['gen_test'\]\) have no "
                                               r"'ground_truth'"):
        export_samples(small, str(out))
    assert not out.exists()  # refused before anything was written
    assert cli.main(["export", small.name, "--output", str(out)]) == 2
    assert "--no-include-generated" in capsys.readouterr().err
    res = export_samples(small, str(out), include_generated=False)
    assert res.num_samples == 15 and res.excluded == {"generated (include_generated=False)": 4}
    with open(out / "excluded.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["reason"] for r in rows} == {"generated (include_generated=False)"}
    import json

    assert json.loads((out / "runs.json").read_text())["excluded"] == res.excluded
    # exported by the field they do carry: the real samples without it are the ones left out, and said so
    res = export_samples(small, str(tmp_path / "by_cluster"), label_field="sa_cluster")
    assert res.num_samples == 4 and res.excluded == {"real sample without 'sa_cluster'": 15}


def test_generated_images_of_another_size_load_in_one_batch_and_export_warns(small, tmp_path):
    """Item 5: 8 px generated images beside 16 px real ones: TorchImageDataset serves one size, export warns."""
    from torch.utils.data import DataLoader

    _add_generated(small, str(tmp_path / "gen"), 3, 8)
    with pytest.warns(UserWarning, match=r"3 image\(s\) of other sizes .* resized to the real images' 16x16"):
        ds = TorchImageDataset(small)
    x, y, w = next(iter(DataLoader(ds, batch_size=len(ds))))
    assert x.shape == (18, 3, 16, 16) and len(y) == 18
    assert TorchImageDataset(small, image_size=12)[0][0].shape == (3, 12, 12)
    with pytest.raises(FairBalanceError, match="image_size"):
        TorchImageDataset(small, image_size=0)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="2 sizes"):
        res = export_samples(small, str(out))
    assert res.image_sizes == {"16x16": 15, "8x8": 3} and res.warnings and res.num_generated == 3
    with open(out / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    gen = sorted((r for r in rows if r["generated"] == "True"), key=lambda r: r["seed"])
    assert [(r["width"], r["height"], r["seed"], r["cell"], r["model_step"], r["generation_run"]) for r in gen] == [
        ("8", "8", str(1000 + i), f"{i % 3}|red", "6", "gen_test") for i in range(3)]
    assert gen[0]["source_filepath"] == "/data/src0.png"
    # a trainer elsewhere: the manifest alone, one size per batch, the same labels
    with pytest.warns(UserWarning, match="resized"):
        from_manifest = TorchImageDataset.from_manifest(str(out / "manifest.csv"))
    xb, yb, _ = next(iter(DataLoader(from_manifest, batch_size=len(from_manifest))))
    assert xb.shape == (18, 3, 16, 16) and sorted(yb.tolist()) == sorted(ds.targets.tolist())


BAD_VALUES = {  # item 4: a bad value in step 2; step 1 must not run, the error names the line
    "method: jtx": ("train-classifier: {method: jtx, epochs: 1, run_key: bad}", "must be one of"),
    "epochs: -1": ("train-classifier: {epochs: -1, run_key: bad}", "epochs must be >= 1"),
    "epochs: ten": ("train-classifier: {epochs: ten, run_key: bad}", "epochs must be int, got 'ten'"),
    "missing local-dir": ("compute-sa-features: {model: 'local-dir:/no/such/clip', attribute: color}",
                          "model folder /no/such/clip does not exist"),
    "model folder": ("generate-balanced: {label_field: color, model: /no/such/model, per_class: 2}",
                     "model /no/such/model does not exist"),
    "unknown field": ("train-classifier: {label_field: no_such_field, epochs: 1, run_key: bad}",
                      "label_field 'no_such_field' is not a field"),
    "duplicate run key": ("balance-report: {label_field: color, run_key: first}", "records run 'first' like"),
}


def test_bad_values_fail_up_front_with_the_line_and_dry_run_says_so(small, tmp_path, capsys):
    for name, (step, message) in BAD_VALUES.items():
        path = tmp_path / f"{name.replace(' ', '_').replace(':', '')}.yml"
        path.write_text(f"dataset: {small.name}\nsteps:\n  - balance-report: {{label_field: color, run_key: first}}\n"
                        f"  - {step}\n")
        for extra in (["--dry-run"], []):
            assert cli.main(["run", str(path), *extra]) == 2, (name, extra)
            err = capsys.readouterr().err
            assert message in err and f"{path}, line 4" in err, (name, err)
        small.reload()
        assert not small.has_run("first"), name  # nothing ran


def test_a_run_made_outside_the_pipeline_is_refused_before_anything_runs(small, tmp_path, capsys):
    """Item 3: the message names the file's line and the YAML key; --dry-run exits 2 as the run would."""
    fb.balance_report(small, "color", run_key="taken")
    path = tmp_path / "p.yml"
    path.write_text(f"dataset: {small.name}\nsteps:\n  - balance-report: {{label_field: ground_truth, run_key: a}}\n"
                    "  - balance-report:\n      label_field: color\n      run_key: taken\n")
    for extra in (["--dry-run"], []):
        assert cli.main(["run", str(path), *extra]) == 2
        err = capsys.readouterr().err
        assert f"{path}, line 6" in err and "add 'overwrite: true' to it" in err and "overwrite=True" not in err
    small.reload()
    assert not small.has_run("a")
    path.write_text(path.read_text() + "      overwrite: true\n")
    assert cli.main(["run", str(path)]) == 0


def test_json_is_only_json_and_busy_exits_3(small, tmp_path, capsys):
    """Item 8: `run --json` prints one JSON document; a key in use by a running operation exits 3 (retry)."""
    import json

    path = tmp_path / "p.yml"
    path.write_text(f"dataset: {small.name}\nsteps:\n  - balance-report: {{label_field: color, run_key: busy}}\n")
    assert cli.main(["run", str(path), "--dry-run", "--json"]) == 0
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["dry_run"] and plan["plan"][0]["state"] == "missing" and "would run" in captured.err
    held = claims._Held()
    held.acquire(f"run:{small._doc.id}:busy", "run busy")
    try:
        assert cli.main(["run", str(path), "--json"]) == 3
        assert "busy" in capsys.readouterr().err
        assert cli.main(["balance-report", small.name, "--label-field", "color", "--run-key", "busy"]) == 3
    finally:
        held.release()
    assert cli.main(["run", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ran"] == [0]


def test_help_is_fast_and_imports_no_capability():
    """Item 8: `fairbalance --help` imports neither torch nor FiftyOne (lazy imports) and takes < 2 s."""
    probe = subprocess.run([sys.executable, "-c", "import sys; from fairbalance.ops import cli; cli.build_parser(); "
                            "print(sorted(m for m in ('torch', 'fiftyone') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "[]", probe.stderr[-2000:]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = fairbalance("--help")
        times.append(time.perf_counter() - t0)
    assert "queue-sharded" in out.stdout and "3 busy" in out.stdout
    assert sorted(times)[1] < 2.0, times


def test_queue_sharded_and_sharded_status_commands(small, capsys):
    """Item 8: the sharding SDK on the command line; a failed shard shows as failed, not queued."""
    import json

    import fiftyone.operators.delegated as food
    from bson import ObjectId

    fb.train_classifier(small, method="biased", epochs=1, batch_size=8, run_key="biased")
    assert cli.main(["queue-sharded", small.name, "compute_hardness_tags", "classifier_run=biased",
                     "--num-shards", "2", "--run-key", "hs", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["run_key"] == "hs" and len(job["queued"]) == 2
    assert cli.main(["sharded-status", small.name, "hs", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [s["state"] for s in status["shards"]] == ["queued", "queued"]
    svc = food.DelegatedOperationService()
    svc.set_failed(ObjectId(job["queued"]["0"]), result=None)
    try:
        assert cli.main(["sharded-status", small.name, "hs"]) == 0
        printed = capsys.readouterr().out
        assert "shard 0: failed" in printed and "shard 1: queued" in printed
        assert cli.main(["status", small.name]) == 0
        assert "sharded job 'hs'" in capsys.readouterr().out
    finally:
        for op in svc.list_operations(dataset_name=small.name):
            svc.delete_operation(op.id)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_ci_example_runs_verbatim(tmp_path):
    """The README's pipeline file and commands, run as written (in a fresh folder, with the installed CLI)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = readme.split("<!-- ci-example:start")[1].split("<!-- ci-example:end -->")[0]
    yaml_text = block.split("```yaml\n")[1].split("```")[0]
    bash = block.split("```bash\n")[1].split("```")[0].replace("\\\n", " ")
    (tmp_path / "ci.yml").write_text(yaml_text)
    exe = os.path.join(os.path.dirname(sys.executable), "fairbalance")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    if not os.path.isfile(exe):  # not installed as a script here: the same command line as a module
        bash = bash.replace("fairbalance ", f"{sys.executable} -m fairbalance ")
    commands = [c.split("  #")[0].strip() for c in bash.splitlines() if c.strip()]
    assert len(commands) == 6 and all(c.startswith(("fairbalance", sys.executable)) for c in commands)
    try:
        outputs = []
        for command in commands:
            out = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=600)
            assert out.returncode == 0, (command, out.stdout[-2000:], out.stderr[-3000:])
            outputs.append(out.stdout)
        assert outputs[0].count("would run") == 7 and outputs[1].count(": finished") == 7
        assert outputs[2].count(": finished") == 5 and outputs[2].count("skipped") == 2  # the stale suffix
        assert "7. export" in outputs[3] and outputs[3].count(": stale") == 5  # the file says epochs 1 again
        assert "PASSED" in outputs[4] and (tmp_path / "report" / "report.md").is_file()
        assert (tmp_path / "export" / "runs.json").is_file() and (tmp_path / "export-train" / "manifest.csv").is_file()
    finally:
        if fo.dataset_exists("ci-digits"):
            fo.delete_dataset("ci-digits")


def test_gate_counts_generated_samples_by_the_cluster_their_features_fall_in(small, tmp_path):
    """Item 8: a generated image planned for cluster 1 whose features lie in cluster 0 counts for cluster 0."""
    rng = np.random.default_rng(0)
    centres = [np.zeros(4), np.full(4, 10.0)]
    small.set_values("sa_features", [centres[i % 2] + rng.normal(0, 0.1, 4) for i in range(len(small))])
    fb.compute_pseudo_labels(small, "sa_features", "sa_cluster", method="kmeans", num_clusters=2)
    counts = small.count_values("sa_cluster.label")
    big, little = sorted(counts, key=counts.get, reverse=True)
    assert counts[big] == counts[little] + 1  # 8 / 7
    _add_generated(small, str(tmp_path / "gen"), 1, 16, labelled=False)
    gen = small.match_tags("generated")
    near_big = small.match(fo.ViewField("sa_cluster.label") == big).first()["sa_features"]
    gen.set_values("sa_cluster", [fo.Classification(label=little)])  # planned: the smaller cluster
    gen.set_values("sa_features", [near_big])  # the image came out like the bigger one
    planned = fb.balance_report(small, "sa_cluster")
    assert planned.imbalance_ratio == 1.0  # by the planned cluster it looks balanced
    result = check_balance(small, "sa_cluster", max_imbalance_ratio=1.0)
    assert not result.passed and result.report.counts == {big: counts[big] + 1, little: counts[little]}
    assert "by the group their own 'sa_features' are nearest to" in result.generated_counted_by
    assert "1 differ from the planned one" in result.format()
    # without features, the planned cluster is used, and the report says so
    gen.set_values("sa_features", [None])
    fallback = check_balance(small, "sa_cluster", max_imbalance_ratio=1.0)
    assert fallback.passed and "without features by their planned 'sa_cluster'" in fallback.generated_counted_by


def test_fiftyone_format_of_a_view_reimports_with_its_run_records(small, tmp_path):
    """Item 7: the `fiftyone` format of a view (not the whole dataset) keeps the runs that made the samples."""
    fb.balance_report(small, "color", run_key="colors_before")
    res = export_samples(small.match_tags("train"), str(tmp_path / "fo"), format="fiftyone")
    back = fo.Dataset.from_dir(str(tmp_path / "fo"), fo.types.FiftyOneDataset)
    try:
        assert len(back) == res.num_samples == 12 and back.has_run("colors_before")
        assert runs.get_run_config(back, "colors_before")["label_field"] == "color"
    finally:
        back.delete()
    assert not [d for d in fo.list_datasets() if d.startswith(small.name + "-")]  # the temporary clone is gone


def test_sharding_a_random_weight_model_is_refused(small, capsys):
    """Item 8: pretrained None (random weights, different in every worker) cannot be sharded."""
    with pytest.raises(FairBalanceError, match="random weights, which differ in every worker"):
        fb.queue_sharded(small, "compute_sa_features", 2, model="ViT-B-32", pretrained=None, attribute="color",
                         run_key="sa_random")
    with pytest.raises(FairBalanceError, match="random weights"):
        fb.compute_sa_features(small, attribute="color", model="ViT-B-32", pretrained=None, shard=0, num_shards=2)
    assert cli.main(["queue-sharded", small.name, "compute_sa_features", "attribute=color", "pretrained=",
                     "--num-shards", "2"]) == 2 and "random weights" in capsys.readouterr().err
    assert not sharding.list_jobs(small)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_runtime_failure_exits_4_and_sdk_words_become_cli_words(small, tmp_path, capsys):
    """Item 8: an unreachable database is a runtime failure (4, with the traceback), not a config error (2); an
    SDK message's ``overwrite=True`` reads as the flag on the command line (item 3)."""
    env = {**os.environ, "FIFTYONE_DATABASE_URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=300&"
                                                  "connectTimeoutMS=300"}
    out = subprocess.run([sys.executable, "-m", "fairbalance", "balance-report", small.name, "--label-field", "color"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 4 and "Traceback" in out.stderr and "fairbalance: failed:" in out.stderr, \
        (out.returncode, out.stderr[-2000:])
    folder = tmp_path / "out"
    assert cli.main(["export", small.name, "--output", str(folder)]) == 0
    capsys.readouterr()
    assert cli.main(["export", small.name, "--output", str(folder)]) == 2  # an earlier export: needs the flag
    err = capsys.readouterr().err
    assert "--overwrite" in err and "overwrite=True" not in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")  # a folder of the user's own files: refused, and the flag is not offered
    assert cli.main(["export", small.name, "--output", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "overwrite=True" not in err


def test_a_record_of_the_earlier_format_counts_as_done(small, tmp_path, capsys):
    """Upgrading: steps recorded before digests chained (own settings only, no stamp) are not all rerun."""
    from fairbalance.ops.pipeline import load_pipeline

    path = tmp_path / "old.yml"
    path.write_text(f"dataset: {small.name}\nsteps:\n  - balance-report: {{label_field: color, run_key: old_a}}\n"
                    "  - balance-report: {label_field: ground_truth, run_key: old_b}\n")
    pipeline = load_pipeline(str(path))
    fb.balance_report(small, "color", run_key="old_a")
    record = runs.prepare(small, pipeline.name, "pipeline", {"file": str(path)}, [], overwrite=True)
    record.write(lambda: None)
    record.save_results({"steps": {"0": {"command": "balance-report", "digest": pipeline.steps[0].digest,
                                         "run_key": "old_a"}}})
    small.reload()
    stamp = str(small.get_run_info("old_a").timestamp)
    assert cli.main(["run", str(path), "--json"]) == 0
    import json

    assert json.loads(capsys.readouterr().out)["ran"] == [1]
    small.reload()
    assert str(small.get_run_info("old_a").timestamp) == stamp
    assert cli.main(["run", str(path), "--json"]) == 0 and json.loads(capsys.readouterr().out)["ran"] == []
