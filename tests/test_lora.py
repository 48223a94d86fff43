"""Per-group LoRA / (Clustered) DreamBooth adapters and group-balanced generation with them.

Tiny randomly initialised models built here and loaded through the public
path: the project's conditional diffusion model and a Stable Diffusion
pipeline saved with ``save_pretrained``. Real MongoDB, real files.
"""

import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fairbalance as fb
from fairbalance.core import runs
from fairbalance.generate.lora import adapters as lora
from fairbalance.generate.diffusion import sample_images, train_conditional_diffusion
from fairbalance.core.models import ModelNotFoundError
from fairbalance.core.validation import FairBalanceError

TINY = dict(image_size=16, block_out_channels=(16, 32), batch_size=32)
CELLS = ["ground_truth", "color"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def digits():
    ds = fb.colored_digits("fb-lora-tests", num_classes=3, train_per_class=20, test_per_class=2, conflict_ratio=0.1,
                           image_size=16, persistent=False, overwrite=True)
    yield ds
    ds.delete()


@pytest.fixture(scope="module")
def cells_model(digits, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("base") / "model")
    return train_conditional_diffusion(digits.match_tags("train"), "ground_truth", attribute_field="color",
                                       output_dir=folder, epochs=1, run_key="base", **TINY)


@pytest.fixture(scope="module")
def cell_adapters(digits, cells_model, tmp_path_factory):
    train = digits.match_tags("train")
    with pytest.warns(UserWarning, match="fewer than 5 images"):
        res = fb.finetune_per_group(train, group_field=CELLS, base_model=cells_model, rank=2, steps=4, lr=1e-2,
                                    output_dir=str(tmp_path_factory.mktemp("ad") / "cells"), run_key="cells")
    return res


def _cells(view):
    out = {}
    for gt, col in zip(*view.values(["ground_truth.label", "color.label"])):
        out[f"{gt}|{col}"] = out.get(f"{gt}|{col}", 0) + 1
    return out


def test_one_adapter_per_cell_trained_saved_and_recorded(digits, cells_model, cell_adapters):
    res = cell_adapters
    real = _cells(digits.match_tags("train"))
    assert sorted(a["group"] for a in res.adapters) == sorted(real)  # one adapter per observed cell
    assert {a["group"]: a["num_images"] for a in res.adapters} == real
    assert res.small_groups == {k: n for k, n in real.items() if n < 5} and res.small_groups  # warned and recorded
    assert res.num_trained == len(real) and res.num_reused == 0 and res.run_key == "cells"
    for a in res.adapters:
        files = os.listdir(a["folder"])
        assert {"adapter_config.json", "adapter_model.safetensors", "fairbalance_adapter.json"} <= set(files)
        assert a["condition"] is not None and a["seconds"] > 0
    assert 0 < res.adapter_bytes < res.base_model_bytes
    stored = runs.load_run_results(digits, "cells")
    assert stored["num_adapters"] == len(real) and stored["small_groups"] == res.small_groups
    assert runs.get_run_config(digits, "cells")["rank"] == 2
    # the adapters were trained: peft initialises lora_B to zero, training moved it
    from safetensors.torch import load_file

    weights = load_file(os.path.join(res.adapters[0]["folder"], "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
    # a rerun with the same configuration keeps every adapter
    again = fb.finetune_per_group(digits.match_tags("train"), group_field=CELLS, base_model=cells_model, rank=2,
                                  steps=4, lr=1e-2, output_dir=res.output_dir, run_key="cells")
    assert again.num_reused == len(real) and again.num_trained == 0


def test_adapters_side_by_side_change_the_images(cell_adapters):
    loaded = lora.load_group_adapters(cell_adapters)
    diff = loaded.base.diff
    names = [a["name"] for a in loaded.adapters[:2]]
    cond = [loaded.adapters[0]["condition"]] * 2
    outs = {}
    for name in [None] + names:
        loaded.use(name)
        outs[name] = sample_images(diff, cond, [1, 2], num_inference_steps=3)
    assert not np.array_equal(outs[None], outs[names[0]])
    assert not np.array_equal(outs[names[0]], outs[names[1]])
    loaded.use(names[0])
    assert np.array_equal(outs[names[0]], sample_images(diff, cond, [1, 2], num_inference_steps=3))


def test_generate_per_group_fills_every_cell_with_provenance(digits, cell_adapters, tmp_path):
    ds = digits.clone()
    try:
        train = ds.match_tags("train")
        real = _cells(train)
        per = 8
        out = str(tmp_path / "gen")
        res = fb.generate_per_group(train, adapters=cell_adapters, mode="fill", per_group=per, groups="all",
                                    num_inference_steps=2, output_dir=out, batch_size=5)
        cells = [f"{c}|{a}" for c in ("0", "1", "2") for a in sorted(ds.distinct("color.label"))]
        expected = {k: max(0, per - real.get(k, 0)) for k in cells}
        assert res.planned == expected and res.added == expected and res.run_key == "generate_per_group"
        gen = ds.match_tags("generated")
        assert len(gen) == sum(expected.values())
        adapter_of = {a["group"]: a["name"] for a in cell_adapters.adapters}
        for s in gen.select_fields(["ground_truth", "color", "generation"]).iter_samples():
            g = s.generation
            assert g["group"] == f"{s.ground_truth.label}|{s.color.label}"
            assert g["adapter"] == adapter_of.get(g["group"])  # observed cells: their adapter; empty: the base
            assert g["cluster"] == 0 and isinstance(g["seed"], int) and g["adapters"] == cell_adapters.output_dir
        assert Image.open(gen.first().filepath).size == (16, 16)
        assert runs.load_run_results(ds, "generate_per_group")["num_added"] == len(gen)
        again = fb.generate_per_group(train, adapters=cell_adapters, mode="fill", per_group=per, groups="all",
                                      num_inference_steps=2, output_dir=out, batch_size=5)
        assert again.num_added == 0 and len(ds.match_tags("generated")) == len(gen)
        # interrupted: one cell's samples and files gone -> only they are made again, with the same pixels
        key = next(k for k, n in expected.items() if n)
        lost = gen.match({"generation.group": key})
        pixels = {os.path.basename(p): np.asarray(Image.open(p)) for p in lost.values("filepath")}
        for p in lost.values("filepath"):
            os.remove(p)
        ds.delete_samples(lost)
        resumed = fb.generate_per_group(train, finetune_run="cells", mode="fill", per_group=per, groups="all",
                                        num_inference_steps=2, output_dir=out, batch_size=3)
        assert resumed.num_added == expected[key] and resumed.added[key] == expected[key]
        for p in ds.match({"generation.group": key}).values("filepath"):
            assert np.array_equal(np.asarray(Image.open(p)), pixels[os.path.basename(p)])
        with pytest.raises(FairBalanceError, match="differs in"):
            fb.generate_per_group(train, adapters=cell_adapters, mode="fill", per_group=per, groups="all",
                                  num_inference_steps=3, output_dir=out)
    finally:
        ds.delete()


def test_clustered_dreambooth_one_adapter_per_cluster(digits, cells_model, tmp_path):
    ds = digits.clone()
    try:
        train = ds.match_tags("train")
        res = fb.finetune_per_group(train, group_field="ground_truth", clusters_per_group=2, method="dreambooth",
                                    base_model_run="base", rank=2, steps=2, min_images=1,
                                    output_dir=str(tmp_path / "db"), run_key="db")
        assert len(res.adapters) == 6 and not res.small_groups
        for c in ("0", "1", "2"):
            mine = [a for a in res.adapters if a["group"] == c]
            assert sorted(a["cluster"] for a in mine) == [0, 1] and sum(a["num_images"] for a in mine) == 20
            assert all(a["condition"] is None for a in mine)  # the adapter stands for its cluster
        gen = fb.generate_per_group(train, finetune_run="db", mode="equal", per_group=5, num_inference_steps=2,
                                    output_dir=str(tmp_path / "g"), run_key="gdb")
        assert gen.added == {"0": 5, "1": 5, "2": 5}
        samples = ds.match_tags("generated")
        for c in ("0", "1", "2"):
            mine = {a["name"]: a["num_images"] for a in res.adapters if a["group"] == c}
            used = samples.match({"ground_truth.label": c}).count_values("generation.adapter")
            assert set(used) <= set(mine) and sum(used.values()) == 5
            big = max(mine, key=mine.get)
            assert used.get(big, 0) >= 5 * mine[big] / 20 - 1  # in proportion to the cluster sizes
        with pytest.raises(FairBalanceError, match="exactly the model's condition fields"):
            fb.generate_per_group(train, finetune_run="db", mode="equal", per_group=1, groups="all",
                                  num_inference_steps=2, output_dir=str(tmp_path / "g2"), run_key="g2")
    finally:
        ds.delete()


def test_adapters_of_another_base_model_are_refused(digits, cell_adapters, tmp_path):
    other = train_conditional_diffusion(digits.match_tags("train"), "ground_truth", attribute_field="color",
                                        output_dir=str(tmp_path / "other"), epochs=1, seed=1, run_key="other",
                                        **TINY)
    with pytest.raises(FairBalanceError, match="another base model"):
        lora.load_group_adapters(cell_adapters, base_model=other)
    with pytest.raises(FairBalanceError, match="another base model"):
        fb.generate_per_group(digits, adapters=cell_adapters, base_model=other, per_group=1,
                              output_dir=str(tmp_path / "x"), run_key="x")
    assert not digits.has_run("x")


def test_bad_input_is_refused_before_any_work(digits, cells_model, tmp_path, monkeypatch):
    train = digits.match_tags("train")
    out = str(tmp_path / "bad")
    cases = [
        (dict(rank=0), "rank must be"),
        (dict(rank=-2), "rank must be"),
        (dict(steps=0), "steps must be"),
        (dict(method="textual_inversion"), "method must be one of"),
        (dict(clusters_per_group=0), "clusters_per_group"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(group_field="no_such_field"), "not found"),
        (dict(group_field="ground_truth"), "must include"),
        (dict(prior_loss_weight=1.0), "prior_loss_weight applies to Stable Diffusion"),
        (dict(base_model=None), "pass base_model"),
    ]
    for kwargs, match in cases:
        kwargs = {"group_field": CELLS, "base_model": cells_model, "output_dir": out, "run_key": "bad", **kwargs}
        with pytest.raises(FairBalanceError, match=match):
            fb.finetune_per_group(train, **kwargs)
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(b"x")
    with pytest.raises(FairBalanceError, match="not a diffusers pipeline"):
        fb.finetune_per_group(train, group_field=CELLS, base_model=str(not_a_model), output_dir=out, run_key="bad")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        fb.finetune_per_group(train, group_field=CELLS, base_model="/no/such/folder", output_dir=out, run_key="bad")
    assert not digits.has_run("bad") and not os.path.exists(out)
    with pytest.raises(ModelNotFoundError, match="No per-group adapters"):
        fb.generate_per_group(train, adapters=str(not_a_model), per_group=1, run_key="bad")
    with pytest.raises(FairBalanceError, match="per_group"):
        fb.generate_per_group(train, adapters=str(not_a_model), run_key="bad")
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match=r"needs the .peft. package: pip install"):
        fb.finetune_per_group(train, group_field=CELLS, base_model=cells_model, output_dir=out, run_key="bad")


@pytest.fixture(scope="module")
def tiny_sd(model_dir):
    import tiny_models

    return tiny_models.build_stable_diffusion(str(model_dir / "sd_for_lora"))


def test_stable_diffusion_dreambooth_tokens_prior_preservation_and_generation(digits, tiny_sd, tmp_path):
    ds = digits.clone()
    try:
        train = ds.match_tags("train")
        res = fb.finetune_per_group(train, group_field="color", method="dreambooth", base_model=tiny_sd, rank=2,
                                    steps=2, prompt="a photo of {token} digit", prior_loss_weight=1.0,
                                    num_prior_images=2, min_images=1, output_dir=str(tmp_path / "sd"),
                                    run_key="sd")
        colors = sorted(ds.match_tags("train").distinct("color.label"))
        assert res.base_kind == "stable_diffusion" and sorted(a["group"] for a in res.adapters) == colors
        assert sorted(a["token"] for a in res.adapters) == sorted(f"sks{i + 1}" for i in range(len(colors)))
        assert all(a["prompt"] == f"a photo of {a['token']} digit" for a in res.adapters)
        for a in res.adapters:  # diffusers' LoRA format
            assert "pytorch_lora_weights.safetensors" in os.listdir(a["folder"])
        loaded = lora.load_group_adapters(res)
        assert sorted(loaded.base.pipe.get_list_adapters()["unet"]) == sorted(a["name"] for a in res.adapters)
        gen = fb.generate_per_group(train, adapters=res, mode="equal", per_group=2, num_inference_steps=2,
                                    guidance_scale=2.0, output_dir=str(tmp_path / "g"), run_key="sdgen")
        assert gen.added == {c: 2 for c in colors}
        samples = ds.match_tags("generated")
        tokens = {a["group"]: a["token"] for a in res.adapters}
        for s in samples.select_fields(["color", "generation"]).iter_samples():
            assert s.generation["token"] == tokens[s.color.label]
            assert s.generation["prompt"] == f"a photo of {tokens[s.color.label]} digit"
        assert Image.open(samples.first().filepath).size == (16, 16)
        with pytest.raises(FairBalanceError, match="conditional base"):
            fb.generate_per_group(train, adapters=res, mode="equal", per_group=1, source="edit",
                                  output_dir=str(tmp_path / "g3"), run_key="sdgen3")
        # the cached pipeline of fairbalance.core.models is left without adapters
        from fairbalance.core import models

        cached = models.load_diffusion_pipeline(tiny_sd, safety_checker=None, requires_safety_checker=False)
        assert not any("lora" in n for n, _ in cached.unet.named_parameters())
        with pytest.raises(FairBalanceError, match="needs '{token}'"):
            fb.finetune_per_group(train, group_field="color", method="dreambooth", base_model=tiny_sd,
                                  prompt="a photo of a digit", run_key="sd2")
    finally:
        ds.delete()


def test_lora_operators_match_the_library(digits, cells_model, tmp_path):
    import fiftyone.operators as foo

    ds = digits.clone()
    try:
        res = foo.execute_operator("@fairbalance/fairbalance/finetune_per_group", ctx={
            "dataset": ds.name, "params": {"group_field": "ground_truth", "attribute_field": "color",
                                           "base_model": cells_model.model_dir, "steps": 2, "rank": 2,
                                           "min_images": 1, "run_key": "op_ft"}})
        assert res.error is None, res.error
        assert res.result["num_adapters"] == len(_cells(ds)) and runs.load_run_results(ds, "op_ft")["steps"] == 2
        with open(os.path.join(res.result["output_dir"], lora.MANIFEST_FILE)) as f:
            assert json.load(f)["config"]["group_fields"] == CELLS
        res = foo.execute_operator("@fairbalance/fairbalance/generate_per_group", ctx={
            "dataset": ds.name, "params": {"finetune_run": "op_ft", "mode": "equal", "per_group": 2,
                                           "num_inference_steps": 2, "run_key": "op_gen"}})
        assert res.error is None, res.error
        assert res.result["num_added"] == 2 * len(_cells(ds.match({"generated": {"$ne": True}})))
        assert len(ds.match_tags("generated")) == res.result["num_added"]
    finally:
        ds.delete()


def test_adapter_weights_load_into_a_fresh_process_model(cell_adapters):
    """What generation loads is what training saved: the same LoRA tensors, bit for bit."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = lora.load_group_adapters(cell_adapters)
    a = loaded.adapters[-1]
    saved = load_file(os.path.join(a["folder"], "adapter_model.safetensors"))
    live = get_peft_model_state_dict(loaded.base.unet, adapter_name=a["name"])
    assert set(saved) == set(live)
    assert all(torch.equal(saved[k], live[k].cpu()) for k in saved)
