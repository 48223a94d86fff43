"""Training under a launcher: two CPU processes (gloo) started by ``torchrun --nproc_per_node 2``.

(``accelerate launch`` 1.x has no ``--multi_cpu``: its ``--cpu`` starts several
processes only through ``mpirun``; torchrun is what it runs for GPUs.)

The script the launcher runs calls the public functions unchanged. Each
process reads Colored Digits from the test MongoDB and trains its half of
every global batch; the main process alone claims, writes the model folders
and records the runs. The 2-process results are then compared with one
process taking the same steps (same global batch): the LoRA adapters
trained on 2 processes give the outputs of those trained here; the diffusion
checkpoint resumes in this process and ends where an uninterrupted
one-process run ends; the classifiers (vanilla and LfF, whose per-sample weights need the
whole global batch) have the weights of the one-process ones. Not bitwise:
the two halves' gradients are averaged by an all-reduce, which rounds in
another order than one process's mean over the whole batch (float32
rounding, ~1e-7 relative). For the diffusion model the comparison is of
losses and model outputs, not raw weights: with one channel per GroupNorm
group at the first level, the biases and time projections before a norm
have a zero gradient in exact arithmetic, and Adam turns their rounding
noise into steps of +-lr whose sign differs between the two runs; those
weights cannot change the outputs (the norm removes them); the other
weights agree within ~1e-6 (a few single elements within 3e-5).
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
from fairbalance.core import claims, runs
from fairbalance.generate.diffusion import load_conditional_diffusion
from fairbalance.generate.lora.adapters import load_group_adapters
from fairbalance.train.training import load_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIFF = dict(image_size=16, block_out_channels=(16, 32), batch_size=16, seed=0, device="cpu")  # 48 images: 3 steps
LORA = dict(rank=2, steps=3, batch_size=4, lr=1e-2, seed=0, device="cpu")  # 2 samples per process and step
CLF = dict(label_field="ground_truth", backbone="mlp", image_size=16, epochs=2, batch_size=16, seed=0, device="cpu")

SCRIPT = textwrap.dedent("""
    import json, sys
    import fiftyone as fo
    import torch
    import fairbalance as fb
    from fairbalance.core import distributed

    name, out, busy = sys.argv[1], sys.argv[2], sys.argv[3]
    diff = json.loads(sys.argv[4])
    clf = json.loads(sys.argv[5])
    lora = json.loads(sys.argv[6])
    ds = fo.load_dataset(name).match_tags("train")  # 48 images
    rank = distributed.rank()
    report = {"rank": rank, "world_size": distributed.world_size()}
    try:  # the test holds this folder: the main process is refused, and every process must hear of it
        fb.train_conditional_diffusion(ds, "color", output_dir=busy, epochs=1, run_key="mp_busy", **diff)
    except fb.ClaimError as e:
        report["busy_error"] = str(e)
    r = fb.train_conditional_diffusion(ds, "color", output_dir=out + "/diffusion", epochs=1, run_key="mp_diff", **diff)
    report["diffusion"] = r.to_dict()
    a = fb.finetune_per_group(ds, group_field="color", base_model=r, output_dir=out + "/adapters", run_key="mp_lora",
                              **lora)
    report["lora"] = [{k: v for k, v in m.items() if k not in ("seconds", "folder")} for m in a.adapters]
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
    ds = fb.colored_digits("fb-multiprocess-tests", num_classes=3, train_per_class=16, test_per_class=1,
                           persistent=True, overwrite=True)
    yield ds.match_tags("train")  # 48 images: 3 global batches of 16
    ds.delete()


@claims.exclusive
def _launch_holding(busy: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 script args`` (CPU: gloo) while this process claims ``busy``."""
    claims.claim_folder(busy)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "python_lib"),
                                                         os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "FIFTYONE_SHOW_PROGRESS_BARS": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@torch.no_grad()
def _outputs(model_dir: str) -> torch.Tensor:
    """The saved (EMA) model's predictions on a fixed batch of noisy images, one per class and timestep."""
    model = load_conditional_diffusion(model_dir)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 16, 16, generator=gen)
    return model.model(x, torch.tensor([10, 200, 500, 700, 900, 990]), torch.tensor([[0], [1], [2], [0], [1], [3]]))


@torch.no_grad()
def _adapter_outputs(folder: str) -> torch.Tensor:
    """:func:`_outputs` of the base model with each adapter of a ``finetune_per_group`` folder in turn."""
    loaded = load_group_adapters(folder, device="cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 16, 16, generator=gen)
    outs = []
    for a in loaded.adapters:
        loaded.use(a["name"])
        outs.append(loaded.base.diff.model(x, torch.tensor([10, 200, 500, 700, 900, 990]),
                                           torch.tensor([a["condition"]] * 6)))
    return torch.stack(outs)


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
    proc = _launch_holding(str(busy), [str(script), digits._root_dataset.name, str(out), str(busy), json.dumps(DIFF),
                                       json.dumps(CLF), json.dumps(LORA)], timeout=600)
    (tmp_path.parent / "mp_stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    digits._root_dataset.reload()  # the runs were recorded by another process

    # two processes, each refused the held folder (the main one by its claim, the other through it)
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]
    assert "in use by a running operation" in reports[0]["busy_error"]
    assert "raised on the main process" in reports[1]["busy_error"]
    assert not busy.exists() and not digits._root_dataset.has_run("mp_busy")
    # one writer: each run recorded once, no claim left behind, both processes saw the same training
    assert {"mp_diff", "mp_vanilla", "mp_lff"} <= set(digits._root_dataset.list_runs())
    assert not claims.list_claims()
    assert reports[0]["diffusion"] == reports[1]["diffusion"] and reports[0]["diffusion"]["steps"] == 3
    for method in ("vanilla", "lff"):
        assert reports[0][method] == reports[1][method]
        w0, w1 = (torch.load(out / f"rank{r}_{method}.pt") for r in (0, 1))
        assert _max_diff(w0, w1) == 0.0  # the processes hold the same weights

    # LoRA on the 2-process model: one adapter per colour, written once, like one process's
    mp_dir = str(out / "diffusion")
    assert reports[0]["lora"] == reports[1]["lora"] and len(reports[0]["lora"]) == 3
    single = fb.finetune_per_group(digits, group_field="color", base_model=mp_dir, output_dir=str(tmp_path / "lora"),
                                   run_key="sp_lora", **LORA)
    assert single.num_trained == 3
    base_out = _outputs(mp_dir)
    lora_mp, lora_one = _adapter_outputs(str(out / "adapters")), _adapter_outputs(single.output_dir)
    assert float((lora_mp - lora_one).abs().max()) < 1e-4
    assert float((lora_one - base_out).abs().max()) > 1e-2  # the adapters change the outputs far more than that

    # diffusion: the 2-process checkpoint resumes here for epoch 2 and ends where one process ends
    at_step3 = _outputs(mp_dir)
    resumed = fb.train_conditional_diffusion(digits, "color", output_dir=mp_dir, epochs=2, run_key="mp_diff", **DIFF)
    assert (resumed.resumed_from_step, resumed.steps) == (3, 6)
    one_dir, straight_dir = str(tmp_path / "one"), str(tmp_path / "straight")
    one_epoch = fb.train_conditional_diffusion(digits, "color", output_dir=one_dir, epochs=1, run_key="sp_diff", **DIFF)
    assert abs(one_epoch.final_loss - reports[0]["diffusion"]["final_loss"]) < 1e-5  # epoch 1: 2 processes = 1
    one = fb.train_conditional_diffusion(digits, "color", output_dir=one_dir, epochs=2, run_key="sp_diff", **DIFF)
    straight = fb.train_conditional_diffusion(digits, "color", output_dir=straight_dir, epochs=2, run_key="st_diff",
                                              **DIFF)
    # resuming is exact in one process (same batches, same noise per step): bitwise the same weights
    assert _max_diff(_training_weights(one_dir), _training_weights(straight_dir)) == 0.0
    assert one.final_loss == straight.final_loss
    # 2 processes + resume: the same losses and the same function (model outputs) within float rounding
    assert abs(resumed.final_loss - straight.final_loss) < 1e-5
    ref = _outputs(straight_dir)
    assert float((_outputs(mp_dir) - ref).abs().max()) < 1e-4
    assert float((at_step3 - ref).abs().max()) > 1e-2  # epoch 2 changed the outputs far more than that

    # classifiers: the model rank 0 saved loads here and equals one process's training on the same batches
    for method in ("vanilla", "lff"):
        saved = load_classifier(str(out / method))
        assert runs.get_run_config(digits, "mp_" + method)["checkpoint"] == str(out / method)
        single = fb.train_classifier(digits, method=method, run_key=None, **CLF)
        assert _max_diff(saved.model.state_dict(), single.model.state_dict()) < 1e-5
        for a, b in zip(reports[0][method], single.history):
            assert a.keys() == b.keys() and all(np.isclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert fo.dataset_exists(digits._root_dataset.name)
