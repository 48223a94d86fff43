import os

import numpy as np
import pytest
from PIL import Image

from fairbalance.core import runs
from fairbalance.generate.diffusion import load_conditional_diffusion, sample_images, train_conditional_diffusion
from fairbalance.generate.filtering import filter_generated
from fairbalance.generate.generation import generate_balanced, plan_counts
from fairbalance.core.validation import FairBalanceError

TINY = dict(image_size=16, block_out_channels=(16, 32), batch_size=32)


@pytest.fixture(scope="module")
def three_colors():
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits("fb-diff-tests", num_classes=3, train_per_class=20, test_per_class=2,
                                 persistent=False, overwrite=True)
    yield ds
    ds.delete()


@pytest.fixture(scope="module")
def trained(three_colors, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("diff") / "model")
    return train_conditional_diffusion(three_colors, "color", output_dir=folder, epochs=1, **TINY)


def test_plan_counts():
    counts = {"a": 50, "b": 30, "c": 20}
    assert plan_counts(counts, "equal", total=2000) == {"a": 666, "b": 666, "c": 666}
    assert plan_counts(counts, "equal", per_class=5) == {"a": 5, "b": 5, "c": 5}
    assert plan_counts(counts, "fill") == {"a": 0, "b": 20, "c": 30}
    with pytest.raises(FairBalanceError, match="smaller than the 3 clusters"):
        plan_counts(counts, "equal", total=2)


def test_train_saves_model_mapping_and_run(three_colors, trained):
    model = load_conditional_diffusion(trained)
    assert model.classes == sorted(three_colors.distinct("color.label"))
    assert model.null_class == 3 and model.model.condition.factor_sizes == [3] and model.attribute_field is None
    res = runs.load_run_results(three_colors, "conditional_diffusion")
    assert res["steps"] == 3 and res["model_dir"] == trained.model_dir == os.fspath(trained)  # 66 images / 32 per batch
    assert trained.steps == 3 and trained.run_key == "conditional_diffusion"
    imgs = sample_images(model, [0, 1], [7, 8], num_inference_steps=3)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == np.uint8
    again = sample_images(model, [1, 0], [8, 7], num_inference_steps=3)
    assert np.array_equal(imgs[0], again[1])  # per-image seeds: batch order does not matter


def test_training_resumes_after_interruption(three_colors, tmp_path):
    folder = str(tmp_path / "m")
    train_conditional_diffusion(three_colors, "color", output_dir=folder, epochs=1, run_key="d1", **TINY)
    train_conditional_diffusion(three_colors, "color", output_dir=folder, epochs=2, run_key="d1", **TINY)
    res = runs.load_run_results(three_colors, "d1")
    assert res["resumed_from_step"] == 3 and res["steps"] == 6
    with pytest.raises(FairBalanceError, match="another configuration"):
        train_conditional_diffusion(three_colors, "color", output_dir=folder, epochs=1, run_key="d1",
                                    image_size=8, block_out_channels=(16, 32), batch_size=32)
    fewer = three_colors.match_tags("train")  # same settings, other images: no silent resume
    with pytest.raises(FairBalanceError, match="another configuration"):
        train_conditional_diffusion(fewer, "color", output_dir=folder, epochs=2, run_key="d1", **TINY)
    train_conditional_diffusion(fewer, "color", output_dir=folder, epochs=1, run_key="d1", overwrite=True, **TINY)
    res = runs.load_run_results(three_colors, "d1")
    assert res["resumed_from_step"] == 0  # started over on the new data


def test_generate_balanced_equal_fill_idempotent(three_colors, trained, tmp_path):
    ds = three_colors.clone()
    try:
        out = str(tmp_path / "gen")
        res = generate_balanced(ds, "color", model=trained, per_class=3, num_inference_steps=2, output_dir=out)
        assert res.added == {c: 3 for c in res.planned}
        gen = ds.match_tags("generated")
        assert len(gen) == 9 and all(os.path.isfile(p) for p in gen.values("filepath"))
        s = gen.first()
        assert s.generated and s.generation["guidance_scale"] == 3.0 and s.generation["model"] == trained.model_dir
        assert Image.open(s.filepath).size == (16, 16)
        again = generate_balanced(ds, "color", model=trained, per_class=3, num_inference_steps=2, output_dir=out)
        assert sum(again.added.values()) == 0 and len(ds.match_tags("generated")) == 9
        # an interrupted run (files and samples of cluster 0 deleted) resumes
        first = gen.match({"color.label": sorted(res.planned)[0]})
        for p in first.values("filepath"):
            os.remove(p)
        ds.delete_samples(first)
        resumed = generate_balanced(ds, "color", model=trained, per_class=3, num_inference_steps=2, output_dir=out)
        assert sum(resumed.added.values()) == 3 and len(ds.match_tags("generated")) == 9
        fill = generate_balanced(ds, "color", model=trained, mode="fill", num_inference_steps=2,
                                 output_dir=str(tmp_path / "fill"), run_key="fill")
        real = ds.match({"generated": {"$ne": True}}).count_values("color.label")
        assert fill.planned == {c: max(real.values()) - n for c, n in real.items()}
    finally:
        ds.delete()


def test_generate_refuses_a_folder_of_another_setting(three_colors, trained, tmp_path):
    ds = three_colors.clone()
    try:
        out = str(tmp_path / "gen")
        generate_balanced(ds, "color", model=trained, per_class=2, num_inference_steps=2, output_dir=out)
        before = sorted(ds.match_tags("generated").values("generation.guidance_scale"))
        with pytest.raises(FairBalanceError, match="differs in: guidance_scale"):  # the same run key
            generate_balanced(ds, "color", model=trained, per_class=2, num_inference_steps=2, output_dir=out,
                              guidance_scale=1.0)
        with pytest.raises(FairBalanceError, match="belongs to run"):  # another key, the same folder
            generate_balanced(ds, "color", model=trained, per_class=2, num_inference_steps=2, output_dir=out,
                              guidance_scale=1.0, run_key="other")
        assert sorted(ds.match_tags("generated").values("generation.guidance_scale")) == before  # nothing written
        res = generate_balanced(ds, "color", model=trained, per_class=2, num_inference_steps=2, output_dir=out,
                                guidance_scale=1.0, overwrite=True)
        gen = ds.match_tags("generated")
        assert sum(res.added.values()) == 6 and len(gen) == 6
        assert set(gen.values("generation.guidance_scale")) == {1.0}
        # files that no manifest explains are refused too
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        Image.new("RGB", (16, 16)).save(foreign / "cluster0_seed0_00000.png")
        with pytest.raises(FairBalanceError, match="did not write"):
            generate_balanced(ds, "color", model=trained, per_class=1, num_inference_steps=2,
                              output_dir=str(foreign), run_key="g2")
    finally:
        ds.delete()


def test_generate_bad_input(three_colors, trained):
    with pytest.raises(FairBalanceError, match="trained on 'color'"):
        generate_balanced(three_colors, "ground_truth", model=trained, per_class=1)
    with pytest.raises(FairBalanceError, match="smaller than"):
        generate_balanced(three_colors, "color", model=trained, total=2)
    with pytest.raises(Exception, match="No conditional diffusion model"):
        generate_balanced(three_colors, "color", model="/nonexistent", per_class=1)
    one = three_colors.match({"color.label": "red"})
    with pytest.raises(FairBalanceError, match="single cluster"):
        train_conditional_diffusion(one, "color", epochs=1, **TINY)


@pytest.fixture(scope="module")
def cells_model(three_colors, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cells") / "model")
    return train_conditional_diffusion(three_colors, "ground_truth", attribute_field="color", output_dir=folder,
                                       epochs=1, run_key="cells_model", **TINY)


def test_cells_fill_every_class_x_attribute_cell(three_colors, cells_model, tmp_path):
    ds = three_colors.clone()
    try:
        model = load_conditional_diffusion(cells_model)
        assert model.attribute_field == "color" and model.model.condition.factor_sizes == [3, 3]
        assert runs.load_run_results(three_colors, "cells_model")["cell_sizes"]["0|red"] > 0
        real = ds.match({"generated": {"$ne": True}})
        cells = {}
        for gt, col in zip(*real.values(["ground_truth.label", "color.label"])):
            cells[(gt, col)] = cells.get((gt, col), 0) + 1
        per_cell = max(cells.values()) - 5
        out = str(tmp_path / "cells")
        res = generate_balanced(ds, "ground_truth", model=cells_model, mode="cells", per_cell=per_cell,
                                source="edit", edit_strength=0.5, num_inference_steps=4, output_dir=out)
        expected = {f"{c}|{a}": max(0, per_cell - cells.get((c, a), 0))
                    for c in model.classes for a in model.attributes}
        assert res.planned == expected and res.added == expected
        gen = ds.match_tags("generated")
        assert len(gen) == sum(expected.values())
        # every generated sample carries the class label (so classifiers can use it), its attribute and provenance
        for s in gen.select_fields(["ground_truth", "color", "generation"]).iter_samples():
            c, a = s.generation["cell"].split("|")
            assert s.ground_truth.label == c and s.color.label == a
            src = ds[s.generation["source_id"]]
            assert src.ground_truth.label == c and src.color.label != a  # an edit of a real image of the class
        assert Image.open(gen.first().filepath).size == (16, 16)
        again = generate_balanced(ds, "ground_truth", model=cells_model, mode="cells", per_cell=per_cell,
                                  source="edit", edit_strength=0.5, num_inference_steps=4, output_dir=out)
        assert sum(again.added.values()) == 0 and len(ds.match_tags("generated")) == len(gen)
        # the same seed gives the same images, whatever the batch
        other = str(tmp_path / "cells_b")
        generate_balanced(ds, "ground_truth", model=cells_model, mode="cells", per_cell=per_cell, source="edit",
                          edit_strength=0.5, num_inference_steps=4, output_dir=other, batch_size=3, run_key="b")
        name = os.path.basename(gen.first().filepath)
        assert np.array_equal(np.asarray(Image.open(os.path.join(out, name))),
                              np.asarray(Image.open(os.path.join(other, name))))
        # contrast guidance from the source's own cell: same cells, other images
        third = str(tmp_path / "cells_c")
        res = generate_balanced(ds, "ground_truth", model=cells_model, mode="cells", per_cell=per_cell,
                                source="edit", guidance_reference="source", attribute_guidance_scale=4.0,
                                num_inference_steps=4, output_dir=third, run_key="c")
        assert res.added == expected
        assert not np.array_equal(np.asarray(Image.open(os.path.join(out, name))),
                                  np.asarray(Image.open(os.path.join(third, name))))
    finally:
        ds.delete()


def test_cells_bad_input_writes_nothing(three_colors, trained, cells_model, tmp_path):
    ds = three_colors.clone()
    try:
        out = str(tmp_path / "bad")
        cases = [
            (dict(model=trained, label_field="color", mode="cells", per_cell=5), "needs a model trained with"),
            (dict(mode="equal", per_class=2), "generates only cells"),
            (dict(mode="cells"), "needs per_cell"),
            (dict(mode="cells", per_cell=5, guidance_scale=float("nan")), "guidance_scale must be"),
            (dict(mode="cells", per_cell=5, scheduler="bogus"), "scheduler must be"),
            (dict(mode="cells", per_cell=5, num_inference_steps=0), "num_inference_steps"),
            (dict(mode="cells", per_cell=5, source="edit", edit_strength=1.5), "edit_strength"),
            (dict(mode="cells", per_cell=5, source="copy"), "source must be"),
            (dict(mode="cells", per_cell=5, guidance_reference="source"), "needs source='edit'"),
            (dict(mode="cells", per_cell=5, source="edit", guidance_reference="x"), "guidance_reference must be"),
        ]
        for kwargs, match in cases:
            kwargs = {"label_field": "ground_truth", "model": cells_model, "output_dir": out, **kwargs}
            with pytest.raises(FairBalanceError, match=match):
                generate_balanced(ds, **kwargs)
        assert len(ds.match_tags("generated")) == 0 and not ds.has_run("generate_balanced")
        assert not os.path.exists(os.path.join(out, "fairbalance_generation.json"))
        with pytest.raises(FairBalanceError, match="must differ"):
            train_conditional_diffusion(ds, "color", attribute_field="color", epochs=1, **TINY)
    finally:
        ds.delete()


def test_corrupt_model_gets_one_clear_error(three_colors, cells_model, tmp_path):
    import shutil

    from fairbalance.core.models import ModelNotFoundError

    broken = str(tmp_path / "broken")
    shutil.copytree(cells_model, broken)
    with open(os.path.join(broken, "condition.safetensors"), "wb") as f:
        f.write(b"truncated")
    with pytest.raises(ModelNotFoundError, match="corrupt or incomplete"):
        load_conditional_diffusion(broken)


def test_filter_generated_scores_and_tags(three_colors, trained, tiny_clip, tmp_path):
    from fairbalance.find.sa_features import compute_sa_features

    ds = three_colors.clone()
    try:
        compute_sa_features(ds, "colors", model=tiny_clip, pretrained=None, num_related_texts=3, num_workers=0)
        generate_balanced(ds, "color", model=trained, per_class=4, num_inference_steps=2,
                          output_dir=str(tmp_path / "g"))
        res = filter_generated(ds, "color", bottom_fraction=0.25)
        gen = ds.match_tags("generated")
        assert res.num_scored == 12 and ds.count("generation_score") == 12
        assert 3 <= res.num_tagged <= 4 and len(ds.match_tags("low_quality")) == res.num_tagged
        assert all(-1 <= v <= 1 for v in gen.values("generation_score"))
        res2 = filter_generated(ds, "color", threshold=2.0, bottom_fraction=None, overwrite=True)
        assert res2.num_tagged == 12  # retagging replaces
        real_train = len(ds.match_tags("train").match({"generated": {"$ne": True}}))
        filter_generated(ds, "color", bottom_fraction=0.25, tag="train", run_key="as_train", score_field="s2")
        filter_generated(ds, "color", bottom_fraction=0.5, tag="train", run_key="as_train", score_field="s2",
                         overwrite=True)
        assert len(ds.match_tags("train").match({"generated": {"$ne": True}})) == real_train  # never untagged
        centroid_scores = gen.values("generation_score")
        texts = {c: f"a {c} handwritten digit" for c in ds.distinct("color.label")}
        with pytest.raises(FairBalanceError, match="missing"):
            filter_generated(ds, "color", texts={"red": "a red digit"}, overwrite=True)
        with pytest.raises(FairBalanceError, match=r"empty: \['red'\]"):
            filter_generated(ds, "color", texts={**texts, "red": "  "}, overwrite=True)
        for bad in (dict(bottom_fraction=1.5), dict(bottom_fraction=0.0),
                    dict(threshold=float("nan"), bottom_fraction=None)):
            with pytest.raises(FairBalanceError, match="bottom_fraction must be|threshold must be"):
                filter_generated(ds, "color", overwrite=True, **bad)
        with pytest.raises(FairBalanceError, match="method must be 'clip'"):
            filter_generated(ds, "color", method="dino", overwrite=True)
        res3 = filter_generated(ds, "color", texts=texts, bottom_fraction=0.5, overwrite=True)
        assert res3.num_scored == 12 and 6 <= res3.num_tagged <= 7
        assert gen.values("generation_score") != centroid_scores  # scored against the texts now
        assert runs.get_run_config(ds, "filter_generated")["score_method"] == "clip"
        # the operator takes the same texts as "cluster: text" lines and gives the same scores
        import fiftyone.operators as foo

        sdk_scores = gen.values("generation_score")
        lines = "\n".join(f"{c}: {t}" for c, t in texts.items())
        with pytest.raises(Exception, match="already exists on this dataset: tick Overwrite"):  # checked on the form
            foo.execute_operator("@fairbalance/fairbalance/filter_generated", ctx={
                "dataset": ds.name, "params": {"label_field": "color", "texts": lines, "bottom_fraction": 0.5}})
        res4 = foo.execute_operator("@fairbalance/fairbalance/filter_generated", ctx={
            "dataset": ds.name, "params": {"label_field": "color", "texts": lines, "bottom_fraction": 0.5,
                                           "overwrite": True}})
        assert res4.error is None, res4.error
        assert res4.result["num_tagged"] == res3.num_tagged and gen.values("generation_score") == sdk_scores
        with pytest.raises(Exception, match="expected 'cluster: text'"):
            foo.execute_operator("@fairbalance/fairbalance/filter_generated", ctx={
                "dataset": ds.name, "params": {"label_field": "color", "texts": "no colon here", "overwrite": True}})
    finally:
        ds.delete()


def test_diffusion_operators(three_colors, tmp_path):
    import fiftyone.operators as foo

    ds = three_colors.clone()
    try:
        res = foo.execute_operator("@fairbalance/fairbalance/train_conditional_diffusion", ctx={
            "dataset": ds.name, "params": {"label_field": "color", "image_size": 16, "epochs": 1, "batch_size": 32,
                                           "run_key": "cd"}})
        assert res.error is None, res.error
        assert res.result["steps"] == 3
        res = foo.execute_operator("@fairbalance/fairbalance/generate_balanced", ctx={
            "dataset": ds.name, "params": {"label_field": "color", "diffusion_run": "cd", "mode": "equal",
                                           "total": 6, "num_inference_steps": 2}})
        assert res.error is None, res.error
        assert res.result["num_added"] == 6 and len(ds.match_tags("generated")) == 6
    finally:
        ds.delete()


def test_class_conditioning_sets_the_colour(tmp_path):
    """A short CPU training run must learn that the class decides the colour (not the initial noise).

    Seeds 0-2 give 20-23 of 24 here; chance is 8, and the epsilon-prediction model got 7.
    """
    from fairbalance.datasets import colored_digits as datasets

    ds = datasets.colored_digits("fb-diff-colour", num_classes=3, train_per_class=60, test_per_class=2,
                                 conflict_ratio=0.0, color_std=0.0, image_size=8, persistent=False, overwrite=True)
    try:
        train = ds.match_tags("train")
        folder = train_conditional_diffusion(train, "color", output_dir=str(tmp_path / "m"), image_size=8,
                                             block_out_channels=(16, 32), batch_size=32, epochs=100, lr=1e-3)
        model = load_conditional_diffusion(folder)
        palette = {n: np.array(rgb, dtype=float) for n, rgb in datasets.CLASS_COLORS[:3]}
        hits = total = 0
        for ci, name in enumerate(model.classes):
            imgs = sample_images(model, [ci] * 8, list(range(8)), guidance_scale=2.0, num_inference_steps=20)
            for img in imgs.astype(float):
                strokes = img[img.max(-1) > 80]
                mean = strokes.mean(0) if len(strokes) else img.reshape(-1, 3).mean(0)
                hits += min(palette, key=lambda n: np.sum((palette[n] - mean) ** 2)) == name
                total += 1
        assert hits / total >= 0.7, f"only {hits}/{total} generated images have their class colour"
    finally:
        ds.delete()
