"""Training under a launcher: two CPU processes (gloo) started by ``accelerate launch --multi_cpu``.

The script the launcher runs calls the public functions unchanged. Each
process reads Colored Digits from the test MongoDB and trains its half of
every global batch; the main process alone claims, writes the model folders
and records the runs. The 2-process results are then compared with one
process taking the same steps (same global batch): the diffusion checkpoint
resumes in this process and ends where an uninterrupted one-process run
ends; the classifiers (vanilla and LfF, whose per-sample weights need the
whole global batch) have the weights of the one-process ones. Not bitwise:
the two halves' gradients are averaged by an all-reduce, which rounds in
another order than one process's mean over the whole batch (differences of
float32 rounding, ~1e-7 relative); the tolerances sit far below the change
one optimisation step makes.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import fiftyone as fo
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fairbalance as fb
from fairbalance import claims, runs
from fairbalance.training import load_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFF = dict(image_size=16, block_out_channels=(16, 32), batch_size=16, seed=0, device="cpu")  # 48 images: 3 steps
CLF = dict(label_field="ground_truth", backbone="mlp", image_size=16, epochs=2, batch_size=16, seed=0, device="cpu")

SCRIPT = textwrap.dedent("""
    import json, sys
    import fiftyone as fo
    import torch
    import fairbalance as fb
    from fairbalance import distributed

    name, out, busy = sys.argv[1], sys.argv[2], sys.argv[3]
    diff = json.loads(sys.argv[4])
    clf = json.loads(sys.argv[5])
    ds = fo.load_dataset(name)
    rank = distributed.rank()
    report = {"rank": rank, "world_size": distributed.world_size()}
    try:  # the test holds this folder: the main process is refused, and every process must hear of it
        fb.train_conditional_diffusion(ds, "color", output_dir=busy, epochs=1, run_key="mp_busy", **diff)
    except fb.ClaimError as e:
        report["busy_error"] = str(e)
    r = fb.train_conditional_diffusion(ds, "color", output_dir=out + "/diffusion", epochs=1, run_key="mp_diff", **diff)
    report["diffusion"] = r.to_dict()
    for method in ("vanilla", "lff"):
        c = fb.train_classifier(ds, method=method, run_key="mp_" + method, output_dir=out + "/" + method, **clf)
        report[method] = c.history
        torch.save(c.model.state_dict(), f"{out}/rank{rank}_{method}.pt")
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits():
    # persistent: the launched processes open it by name from the same database
    ds = fb.colored_digits("fb-multiprocess-tests", num_classes=3, train_per_class=16, test_per_class=0,
                           persistent=True, overwrite=True)
    yield ds
    ds.delete()


@claims.exclusive
def _launch_holding(busy: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_cpu --num_processes 2 script args`` while this process claims ``busy``."""
    claims.claim_folder(busy)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "python_lib"),
                                                         os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "FIFTYONE_SHOW_PROGRESS_BARS": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _training_weights(model_dir: str) -> dict:
    """The raw (non-EMA) weights of the last training checkpoint."""
    state = os.path.join(model_dir, "training_state")
    with open(os.path.join(state, "latest.json")) as f:
        return load_file(os.path.join(state, json.load(f)["folder"], "model.safetensors"))


def test_two_processes_train_like_one(digits, tmp_path):
    out, busy = tmp_path / "mp", tmp_path / "busy"
    out.mkdir()
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    proc = _launch_holding(str(busy), [str(script), digits.name, str(out), str(busy), json.dumps(DIFF),
                                       json.dumps(CLF)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    # two processes, each refused the held folder (the main one by its claim, the other through it)
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]
    assert "in use by a running operation" in reports[0]["busy_error"]
    assert "raised on the main process" in reports[1]["busy_error"]
    assert not busy.exists() and not digits.has_run("mp_busy")
    # one writer: each run recorded once, no claim left behind, both processes saw the same training
    assert {"mp_diff", "mp_vanilla", "mp_lff"} <= set(digits.list_runs())
    assert not claims.list_claims()
    assert reports[0]["diffusion"] == reports[1]["diffusion"] and reports[0]["diffusion"]["steps"] == 3
    for method in ("vanilla", "lff"):
        assert reports[0][method] == reports[1][method]
        w0, w1 = (torch.load(out / f"rank{r}_{method}.pt") for r in (0, 1))
        assert _max_diff(w0, w1) == 0.0  # the processes hold the same weights

    # diffusion: the 2-process checkpoint resumes here for epoch 2 and ends where one process ends
    mp_dir = str(out / "diffusion")
    resumed = fb.train_conditional_diffusion(digits, "color", output_dir=mp_dir, epochs=2, run_key="mp_diff", **DIFF)
    assert (resumed.resumed_from_step, resumed.steps) == (3, 6)
    one_dir = str(tmp_path / "one")
    one_epoch = fb.train_conditional_diffusion(digits, "color", output_dir=one_dir, epochs=1, run_key="sp_diff", **DIFF)
    first = _training_weights(one_dir)
    assert abs(one_epoch.final_loss - reports[0]["diffusion"]["final_loss"]) < 1e-5
    one = fb.train_conditional_diffusion(digits, "color", output_dir=one_dir, epochs=2, run_key="sp_diff", **DIFF)
    straight_dir = str(tmp_path / "straight")
    straight = fb.train_conditional_diffusion(digits, "color", output_dir=straight_dir, epochs=2, run_key="st_diff",
                                              **DIFF)
    moved = _max_diff(_training_weights(one_dir), first)
    assert moved > 1e-4  # epoch 2 changed the weights far more than the tolerances below
    # resuming is exact in one process; 2 processes + resume agree within float rounding
    assert _max_diff(_training_weights(one_dir), _training_weights(straight_dir)) == 0.0
    assert one.final_loss == straight.final_loss
    assert _max_diff(_training_weights(mp_dir), _training_weights(straight_dir)) < 1e-5
    assert abs(resumed.final_loss - straight.final_loss) < 1e-5
    ema_mp = load_file(os.path.join(mp_dir, "unet", "diffusion_pytorch_model.safetensors"))
    ema_one = load_file(os.path.join(straight_dir, "unet", "diffusion_pytorch_model.safetensors"))
    assert _max_diff(ema_mp, ema_one) < 1e-5

    # classifiers: the model rank 0 saved loads here and equals one process's training on the same batches
    for method in ("vanilla", "lff"):
        saved = load_classifier(str(out / method))
        assert runs.get_run_config(digits, "mp_" + method)["checkpoint"] == str(out / method)
        single = fb.train_classifier(digits, method=method, run_key=None, **CLF)
        assert _max_diff(saved.model.state_dict(), single.model.state_dict()) < 1e-5
        for a, b in zip(reports[0][method], single.history):
            assert a.keys() == b.keys() and all(np.isclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert fo.dataset_exists(digits.name)
