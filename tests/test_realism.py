"""Realism of generated sets: the classifier two-sample test, TSTR, image statistics, the discriminator filter.

Real Colored Digits on the real MongoDB; the "generated" images are real
files written here: either other real images (indistinguishable) or real
images with a bright haze (what issue #28 found: generated images 1.8x as
bright), so the measurement has a known answer. No mocks.
"""

import os

import fiftyone as fo
import numpy as np
import pytest
from PIL import Image

import fairbalance as fb
from fairbalance.core import runs
from fairbalance.core.validation import FairBalanceError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _haze(path: str, out: str) -> None:
    img = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    Image.fromarray(np.clip(img * 1.3 + 30, 0, 255).astype(np.uint8)).save(out)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Colored Digits (16 px) whose train split is cut in two halves, plus hazy copies of the second half."""
    tmp = tmp_path_factory.mktemp("realism")
    ds = fb.colored_digits(f"fb-realism-{os.getpid()}", num_classes=10, train_per_class=40, test_per_class=10,
                           conflict_ratio=0.05, image_size=16, persistent=False, overwrite=True,
                           output_dir=str(tmp / "digits"))
    train = ds.match_tags("train")
    ids = train.values("id")
    perm = np.random.default_rng(0).permutation(len(ids))
    ds.select([ids[i] for i in perm[: len(ids) // 2]]).tag_samples("half_a")
    ds.select([ids[i] for i in perm[len(ids) // 2:]]).tag_samples("half_b")
    samples = []
    for k, (path, gt, col) in enumerate(zip(*ds.match_tags("half_b").values(
            ["filepath", "ground_truth.label", "color.label"]))):
        out = str(tmp / f"haze_{k:04d}.png")
        _haze(path, out)
        samples.append(fo.Sample(filepath=out, tags=["generated"], generated=True,
                                 ground_truth=fo.Classification(label=gt), color=fo.Classification(label=col)))
    ds.add_samples(samples)
    yield ds
    ds.delete()


def _clear(ds, key):
    if ds.has_run(key):
        runs.delete_run(ds, key)


def test_real_versus_real_is_indistinguishable(digits):
    _clear(digits, "rr")
    res = fb.measure_realism(digits.match_tags("half_a"), digits.match_tags("half_b"), attribute_field="color",
                             run_key="rr")
    assert abs(res.two_sample_accuracy - 0.5) <= 0.12, res.two_sample_accuracy
    assert not res.separable and res.warnings == []
    assert 0.8 <= res.intensity_ratio <= 1.25
    # both halves are real: a classifier trained on either reads the other as well (same count)
    assert res.tstr_accuracy > 0.6 and abs(res.tstr_accuracy - res.trtr_accuracy) <= 0.15
    assert res.num_real == res.num_generated == 200
    assert runs.get_run_config(digits, "rr")["method"] == "fairbalance.realism"
    assert runs.load_run_results(digits, "rr")["two_sample_accuracy"] == res.two_sample_accuracy


def test_hazy_images_are_trivially_separable_and_warned(digits):
    _clear(digits, "rs")
    res = fb.measure_realism(digits.match_tags(["half_a", "generated"]), label_field="ground_truth",
                             attribute_field="color", test_samples=digits.match_tags("test"), run_key="rs")
    assert res.two_sample_accuracy >= 0.95 and res.separable
    assert any("discriminator" in w for w in res.warnings) and any("bright" in w for w in res.warnings)
    assert res.intensity_ratio > 1.5
    g, r = res.generated_statistics, res.real_statistics
    assert g["background_intensity"] > r["background_intensity"] + 0.05 and g["count"] == r["count"] == 200
    cell = next(c for c, v in res.cell_statistics.items() if "real" in v and "generated" in v)
    assert "|" in cell and res.cell_statistics[cell]["generated"]["mean_intensity"] > \
        res.cell_statistics[cell]["real"]["mean_intensity"]
    assert res.num_tstr_test == len(digits.match_tags("test")) and res.tstr_accuracy is not None
    assert res.to_dict()["separable"] is True
    with pytest.raises(FairBalanceError, match="already exists"):
        fb.measure_realism(digits.match_tags(["half_a", "generated"]), run_key="rs")


def test_bad_input_is_refused_before_any_run(digits):
    half = digits.match_tags("half_a")
    with pytest.raises(FairBalanceError, match="discriminator"):
        fb.measure_realism(half, digits.match_tags("half_b"), discriminator="svm", run_key="bad")
    with pytest.raises(FairBalanceError, match="share images"):
        fb.measure_realism(half, half, run_key="bad")
    with pytest.raises(FairBalanceError, match="not found"):
        fb.measure_realism(half, digits.match_tags("half_b"), label_field="nope", run_key="bad")
    with pytest.raises(FairBalanceError, match="folds"):
        fb.measure_realism(half, digits.match_tags("half_b"), folds=1, run_key="bad")
    for seed in (-1, 2**32, 1.5):  # a seed the discriminators' generators cannot take
        with pytest.raises(FairBalanceError, match="seed"):
            fb.measure_realism(half, digits.match_tags("half_b"), seed=seed, run_key="bad")
    assert not digits.has_run("bad")


@pytest.fixture(scope="module")
def two_colours(tmp_path_factory):
    """Two digit classes in two colours: a biased train split (every 0 in one colour, every 1 in the other) and an
    unbiased test split cut into a "generated" stand-in (its real bias-conflicting images: the cells a repair
    fills) and a held-out reference. No image is made up: the known answer is that the stand-in is real."""
    tmp = tmp_path_factory.mktemp("two_colours")
    ds = fb.colored_digits(f"fb-realism-ref-{os.getpid()}", num_classes=2, train_per_class=150, test_per_class=150,
                           conflict_ratio=0.01, image_size=16, persistent=False, overwrite=True,
                           output_dir=str(tmp / "digits"))
    ids, aligned = ds.match_tags("test").values(["id", "bias_aligned"])
    conflicting = [i for i, a in zip(ids, aligned) if not a]
    ds.select(conflicting[: len(conflicting) // 2]).tag_samples("as_generated")
    ds.select(conflicting[len(conflicting) // 2:] + [i for i, a in zip(ids, aligned) if a]).tag_samples("reference")
    yield ds
    ds.delete()


def test_real_conflicting_cells_pass_against_a_cell_matched_reference(two_colours):
    """Real images of the bias-conflicting cells are told from the biased training images (what the README's
    ideal sets showed), and pass for real against a reference of the same cells."""
    ds = two_colours
    train, gen, ref = ds.match_tags("train"), ds.match_tags("as_generated"), ds.match_tags("reference")
    kw = dict(label_field="ground_truth", attribute_field="color", epochs=30)
    res = fb.measure_realism(train, gen, reference_samples=ref, match_cells=True, run_key="ref_matched", **kw)
    num_gen = len(gen)
    ref_conflicting = len(ref.match({"bias_aligned": False}))
    assert res.two_sample_accuracy >= 0.8, res.two_sample_accuracy  # against the biased training images
    assert abs(res.reference_two_sample_accuracy - 0.5) <= 0.12, res.reference_two_sample_accuracy
    assert res.reference_cells_matched == res.reference_cells_total == 2
    assert res.reference_num_generated == num_gen and res.reference_num_real == ref_conflicting  # aligned weigh 0
    assert 0.8 <= res.reference_intensity_ratio <= 1.25
    cfg = runs.get_run_config(ds, "ref_matched")
    assert cfg["match_cells"] is True and cfg["reference_dataset"] == ds.name and cfg["reference_view"]
    stored = runs.load_run_results(ds, "ref_matched")
    assert stored["reference_two_sample_accuracy"] == res.reference_two_sample_accuracy
    # the same reference unmatched: its bias-aligned half gives the generated cells away
    plain = fb.measure_realism(train, gen, reference_samples=ref, run_key="ref_plain", **kw)
    assert plain.reference_two_sample_accuracy > res.reference_two_sample_accuracy + 0.1, \
        (plain.reference_two_sample_accuracy, res.reference_two_sample_accuracy)
    assert plain.reference_num_real == len(ref) and plain.reference_cells_matched is None
    # the default is unchanged: no reference, no reference figure
    old = fb.measure_realism(train, gen, run_key="ref_none", **kw)
    assert old.reference_two_sample_accuracy is None and old.two_sample_accuracy == res.two_sample_accuracy
    assert runs.get_run_config(ds, "ref_none")["reference_view"] is None


def test_a_separable_set_is_separable_against_the_reference_too(digits):
    _clear(digits, "ref_haze")
    _clear(digits, "ref_haze_all")
    half, gen, test = digits.match_tags("half_a"), digits.match_tags("generated"), digits.match_tags("test")
    res = fb.measure_realism(half, gen, attribute_field="color", reference_samples=test, run_key="ref_haze_all")
    assert res.reference_two_sample_accuracy >= 0.95 and res.two_sample_accuracy >= 0.95
    assert any("reference samples too" in w for w in res.warnings) and res.reference_intensity_ratio > 1.5
    # matched to the generated cells: 100 test images over the generated set's cells, a few per cell, still high
    res = fb.measure_realism(half, gen, attribute_field="color", reference_samples=test, match_cells=True,
                             run_key="ref_haze")
    assert res.reference_two_sample_accuracy >= 0.8, res.reference_two_sample_accuracy
    assert 0 < res.reference_cells_matched < res.reference_cells_total  # 95% aligned: some cells lack test images
    assert res.reference_num_generated < res.num_generated


def test_bad_references_are_refused_before_any_run(digits, tmp_path):
    half, gen, test = digits.match_tags("half_a"), digits.match_tags("generated"), digits.match_tags("test")
    kw = dict(attribute_field="color", run_key="bad_ref")
    other = fo.Dataset()  # real images without the attribute field
    other.add_samples([fo.Sample(filepath=p, ground_truth=fo.Classification(label=g))
                       for p, g in zip(*test.values(["filepath", "ground_truth.label"]))])
    unseen = fo.Dataset()  # cells the generated set does not have
    path = str(tmp_path / "odd.png")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    unseen.add_samples([fo.Sample(filepath=path, ground_truth=fo.Classification(label="x"),
                                  color=fo.Classification(label="y"))])
    try:
        for ref, extra, match in [
                (test.limit(0), {}, "reference_samples is empty"),
                (other, {"match_cells": True}, "not found"),
                (gen.limit(3), {}, "generated == True"),
                (half.limit(3), {}, "shares 3 image"),
                (None, {"match_cells": True}, "pass reference_samples"),
                (test, {"match_cells": True, "attribute_field": None}, "label_field and an attribute_field"),
                (test, {"match_cells": "yes"}, "True or False"),
                (unseen, {"match_cells": True}, "0 of"),
                ("test", {}, "dataset or view")]:
            with pytest.raises(FairBalanceError, match=match):
                fb.measure_realism(half, gen, reference_samples=ref, **{**kw, **extra})
        # a reference that is a copy of generated files (same paths) is refused too
        gen_copy = fo.Dataset()
        gen_copy.add_samples([fo.Sample(filepath=p) for p in gen.limit(2).values("filepath")])
        with pytest.raises(FairBalanceError, match="generated samples"):
            fb.measure_realism(half, gen, reference_samples=gen_copy, run_key="bad_ref")
        gen_copy.delete()
    finally:
        other.delete()
        unseen.delete()
    assert not digits.has_run("bad_ref")


@pytest.fixture
def mixed(tmp_path):
    """Real train digits + generated ones: 40 exact copies of real images (pass for real) and 40 hazy ones."""
    ds = fb.colored_digits(f"fb-realism-mixed-{os.getpid()}", num_classes=5, train_per_class=40, test_per_class=8,
                           conflict_ratio=0.05, image_size=16, persistent=False, overwrite=True,
                           output_dir=str(tmp_path / "digits"))
    train = ds.match_tags("train")
    rows = list(zip(*train.values(["filepath", "ground_truth.label", "color.label"])))
    rng = np.random.default_rng(1)
    samples = []
    for k, j in enumerate(rng.permutation(len(rows))[:80]):
        path, gt, col = rows[j]
        out = str(tmp_path / f"gen_{k:03d}.png")
        hazy = k >= 40
        if hazy:
            _haze(path, out)
        else:  # another real-looking image: a real one with a little pixel noise
            img = np.asarray(Image.open(path).convert("RGB"), dtype=float)
            Image.fromarray(np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8)).save(out)
        samples.append(fo.Sample(filepath=out, tags=["generated"], generated=True, hazy=hazy,
                                 ground_truth=fo.Classification(label=gt), color=fo.Classification(label=col)))
    ds.add_samples(samples)
    yield ds
    ds.delete()


def test_discriminator_filter_excludes_the_separable_without_any_label(mixed):
    ds = mixed
    view = ds.match_tags(["train", "generated"])
    hazy = set(ds.match({"hazy": True}).values("id"))
    # no bias, cluster or class label is needed: the label field named does not even exist
    res = fb.filter_generated(view, "no_such_field", method="discriminator", bottom_fraction=0.5, action="exclude",
                              score_field="realism_score")
    marked = set(ds.match({"filtered_out": True}).values("id"))
    assert res.num_scored == 80 and res.num_excluded == 40
    assert len(marked & hazy) >= 36, len(marked & hazy)  # the hazy images are the most separable
    assert 0.6 < res.two_sample_accuracy < 0.9  # half of the generated set passes for real
    scores = dict(zip(*ds.match_tags("generated").values(["id", "realism_score"])))
    assert np.median([scores[i] for i in hazy]) < 0.2 < np.median([s for i, s in scores.items() if i not in hazy])
    cfg = runs.get_run_config(ds, "filter_generated")
    assert cfg["score_method"] == "discriminator" and cfg["folds"] == 5 and cfg["label_field"] is None
    assert runs.load_run_results(ds, "filter_generated")["two_sample_accuracy"] == res.two_sample_accuracy
    clf = fb.train_classifier(view, method="synthetic", epochs=1, run_key=None)
    assert clf.num_filtered_out == 40 and clf.num_generated_used == 40


def test_discriminator_filter_within_each_cell_keeps_every_cells_share(mixed):
    """Oversample, then keep the most realistic: ``within`` excludes the most separable half of each cell,
    where one global cut would empty the all-hazy cell (the recipe of the README's realism section)."""
    ds = mixed
    gen = ds.match_tags("generated")
    hazy = dict(zip(*gen.values(["id", "hazy"])))
    ids = sorted(hazy, key=lambda i: (hazy[i], i))  # 40 clean then 40 hazy
    cell = {i: ("clean" if k < 30 else "hazy" if k >= 50 else "mixed") for k, i in enumerate(ids)}
    gen.set_values("cell", cell, key_field="id")
    view = ds.match_tags(["train", "generated"])
    res = fb.filter_generated(view, method="discriminator", bottom_fraction=0.5, action="exclude", within="cell",
                              score_field="realism_score", exclude_field="out_cell", run_key="fcell")
    out, score = (dict(zip(*gen.values(["id", f]))) for f in ("out_cell", "realism_score"))
    assert res.num_excluded == 40
    for name, size in (("clean", 30), ("mixed", 20), ("hazy", 30)):
        members = sorted((i for i in ids if cell[i] == name), key=lambda i: score[i])
        assert [out[i] for i in members] == [True] * (size // 2) + [False] * (size - size // 2), name
    mixed_out = [i for i in ids if cell[i] == "mixed" and out[i]]
    assert sum(hazy[i] for i in mixed_out) >= 8  # within the mixed cell the hazy half goes
    assert runs.get_run_config(ds, "fcell")["within"] == "cell"
    # a global cut would have left the hazy cell with almost nothing
    glob = fb.filter_generated(view, method="discriminator", bottom_fraction=0.5, action="exclude",
                               score_field="score_all", exclude_field="out_all", run_key="fall")
    kept_hazy = sum(1 for i, o in zip(*gen.values(["id", "out_all"])) if not o and cell[i] == "hazy")
    assert glob.num_excluded == 40 and kept_hazy <= 5
    with pytest.raises(FairBalanceError, match="within"):
        fb.filter_generated(view, method="discriminator", threshold=0.5, bottom_fraction=None, within="cell",
                            run_key="fbad")
    with pytest.raises(FairBalanceError, match="not found"):
        fb.filter_generated(view, method="discriminator", within="no_such_field", run_key="fbad")
    assert not ds.has_run("fbad")
    # the App's form takes the same option and gives the same cut (on the whole dataset, as the App runs it)
    import fiftyone.operators as foo

    params = dict(label_field="ground_truth", method="discriminator", bottom_fraction=0.5, action="exclude")
    sdk = fb.filter_generated(ds, within="cell", score_field="s_sdk", exclude_field="o_sdk", run_key="sdk", **params)
    with pytest.raises(Exception, match="No field 'no_such_field' on this dataset to cut within"):
        foo.execute_operator("@fairbalance/fairbalance/filter_generated", ctx={
            "dataset": ds.name, "params": {**params, "within": "no_such_field", "run_key": "app"}})
    res = foo.execute_operator("@fairbalance/fairbalance/filter_generated", ctx={
        "dataset": ds.name, "params": {**params, "within": "cell", "run_key": "app"}})
    assert res.error is None, res.error
    assert runs.get_run_config(ds, "app")["within"] == "cell" and res.result["num_excluded"] == sdk.num_excluded
    app_field = runs.get_run_config(ds, "app")["exclude_field"]
    assert gen.values(app_field) == gen.values("o_sdk")


def test_discriminator_weights_are_density_ratios_training_uses(mixed):
    from fairbalance.train import training

    ds = mixed
    view = ds.match_tags(["train", "generated"])
    res = fb.filter_generated(view, method="discriminator", bottom_fraction=0.1, action="weight", max_weight=5.0,
                              score_field="realism_score", run_key="fw")
    gen = ds.match_tags("generated")
    ids, p, w = gen.values(["id", "realism_score", "generation_weight"])
    p, w = np.array(p), np.array(w)
    ratio = np.minimum(np.clip(p, 1e-6, 1 - 1e-6) / (1 - np.clip(p, 1e-6, 1 - 1e-6)), 5.0)
    assert np.allclose(w, ratio / ratio.mean()) and res.mean_weight == pytest.approx(1.0)
    hazy = np.array(gen.values("hazy"))
    assert w[hazy].mean() < 0.5 * w[~hazy].mean()
    data = training.labelled_samples(view, "ground_truth")
    for method in ("synthetic", "two_stage"):
        cfg = training.TrainConfig("ground_truth", data.classes, method, weight_field="generation_weight")
        weights = training._sample_weights(view, data, cfg)
        by_id = dict(zip(ids, w))
        assert np.allclose(weights, [by_id.get(i, 1.0) for i in data.ids])  # real 1, generated their ratio
    two = fb.train_classifier(view, method="two_stage", weight_field="generation_weight", epochs=1, head_epochs=1,
                              run_key=None)
    assert two.num_generated_used == 80


def test_discriminator_filter_bad_input_writes_nothing(mixed):
    ds = mixed
    view = ds.match_tags(["train", "generated"])
    for kwargs, match in [(dict(folds=1), "folds"), (dict(max_weight=0.5), "max_weight"),
                          (dict(texts={"0": "a red digit"}), "compares images only")]:
        with pytest.raises(FairBalanceError, match=match):
            fb.filter_generated(view, method="discriminator", **kwargs)
    with pytest.raises(FairBalanceError, match="real samples"):
        fb.filter_generated(ds.match_tags("generated"), method="discriminator")
    assert not ds.has_run("filter_generated") and not ds.has_field("generation_score")


TINY = dict(image_size=16, block_out_channels=(16, 32), batch_size=32)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """Colored Digits (3 classes) and a tiny class x colour diffusion model trained one epoch on it."""
    tmp = tmp_path_factory.mktemp("cells")
    ds = fb.colored_digits(f"fb-realism-cells-{os.getpid()}", num_classes=3, train_per_class=20, test_per_class=2,
                           image_size=16, persistent=False, overwrite=True, output_dir=str(tmp / "digits"))
    model = fb.train_conditional_diffusion(ds, "ground_truth", attribute_field="color", output_dir=str(tmp / "m"),
                                           epochs=1, run_key="cells_model", **TINY)
    yield ds, model
    ds.delete()


def test_generation_result_reports_realism(cells, tmp_path):
    src, model = cells
    ds = src.clone()
    try:
        kwargs = dict(mode="cells", per_cell=8, source="noise", num_inference_steps=3, realism_sample=40)
        with pytest.warns(UserWarning, match="discriminator tells"):  # a one-epoch model from noise: noise
            res = fb.generate_balanced(ds, "ground_truth", model=model, output_dir=str(tmp_path / "a"), **kwargs)
        real = res.realism
        assert real["num_generated"] == min(40, res.num_added) and real["num_real"] == 40
        assert real["two_sample_accuracy"] >= 0.9 and "discriminator" in real["warning"]
        out = res.to_dict()
        assert out["two_sample_accuracy"] == real["two_sample_accuracy"] and out["realism_warning"]
        stored = runs.load_run_results(ds, "generate_balanced")
        assert stored["realism"]["two_sample_accuracy"] == real["two_sample_accuracy"]
        assert real["generated_mean_intensity"] != real["real_mean_intensity"]
        skipped = fb.generate_balanced(ds, "ground_truth", model=model, output_dir=str(tmp_path / "b"),
                                       run_key="b", **{**kwargs, "realism_sample": 0})
        assert skipped.realism is None and "two_sample_accuracy" not in skipped.to_dict()
        with pytest.raises(FairBalanceError, match="realism_sample"):
            fb.generate_balanced(ds, "ground_truth", model=model, run_key="c", **{**kwargs, "realism_sample": -1})
        assert not ds.has_run("c")
    finally:
        ds.delete()


def _sources(ds, diff, n=6):
    from fairbalance.train import training

    paths, gt, col = ds.match_tags("train").values(["filepath", "ground_truth.label", "color.label"])
    x = training.load_images(paths[:n], [16, 16], scale="symmetric")
    own = [(diff.classes.index(g), diff.attributes.index(c)) for g, c in zip(gt[:n], col[:n])]
    return x, own, ((x + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()


def test_ddim_inversion_gives_the_source_back_under_its_own_condition(cells):
    from fairbalance.generate.diffusion import load_conditional_diffusion, sample_images

    ds, model = cells
    diff = load_conditional_diffusion(model)
    x, own, src = _sources(ds, diff)
    kw = dict(guidance_scale=1.0, num_inference_steps=25, attribute_guidance_scale=1.0, init_images=x,
              edit_strength=0.5, reference_labels=own)
    noised = sample_images(diff, own, list(range(len(own))), **kw)
    inverted = sample_images(diff, own, list(range(len(own))), inversion=True, **kw)
    err_noised, err_inverted = (np.abs(a.astype(float) - src).mean() for a in (noised, inverted))
    assert err_inverted < 10 and err_inverted < err_noised / 3, (err_inverted, err_noised)
    # another colour asked: the inverted start changes the image (not a copy of the source)
    other = [(c, (a + 1) % len(diff.attributes)) for c, a in own]
    moved = sample_images(diff, other, list(range(len(own))), inversion=True,
                          **{**kw, "attribute_guidance_scale": 4.0})
    assert np.abs(moved.astype(float) - src).mean() > err_inverted
    with pytest.raises(FairBalanceError, match="init_images"):
        sample_images(diff, own, [0] * len(own), inversion=True)


def test_keep_background_copies_the_source_background(cells, tmp_path):
    from fairbalance.generate.diffusion import background_mask, load_conditional_diffusion, sample_images

    src_ds, model = cells
    diff = load_conditional_diffusion(model)
    x, own, src = _sources(src_ds, diff)
    out = sample_images(diff, own, list(range(len(own))), num_inference_steps=4, init_images=x, edit_strength=0.8,
                        keep_background=True)
    mask = background_mask(x)[:, 0].numpy()
    assert 0.3 < mask.mean() < 0.98  # a digit on a background
    assert np.array_equal(out[mask], src[mask].astype(np.uint8))
    plain = sample_images(diff, own, list(range(len(own))), num_inference_steps=4, init_images=x, edit_strength=0.8)
    assert not np.array_equal(plain[mask], src[mask].astype(np.uint8))
    # through generate_balanced: recorded in the provenance, the background of every edit is its source's
    ds = src_ds.clone()
    try:
        res = fb.generate_balanced(ds, "ground_truth", model=model, mode="cells", per_cell=8, source="edit",
                                   inversion=True, keep_background=True, guidance_reference="source",
                                   attribute_guidance_scale=3.0, num_inference_steps=6, realism_sample=0,
                                   output_dir=str(tmp_path / "kb"))
        assert res.num_added > 0
        cfg = runs.get_run_config(ds, "generate_balanced")
        assert cfg["inversion"] is True and cfg["keep_background"] is True
        for s in ds.match_tags("generated").select_fields("generation").iter_samples():
            assert s.generation["inversion"] and s.generation["keep_background"]
            gen = np.asarray(Image.open(s.filepath).convert("RGB"))
            source = np.asarray(Image.open(s.generation["source_filepath"]).convert("RGB"))
            from fairbalance.train import training

            m = background_mask(training.load_images([s.generation["source_filepath"]], [16, 16],
                                                     scale="symmetric"))[0, 0].numpy()
            assert np.array_equal(gen[m], source[m])
        for kwargs, match in [(dict(source="noise", inversion=True), "needs source='edit'"),
                              (dict(source="edit", keep_background="yes"), "True or False")]:
            with pytest.raises(FairBalanceError, match=match):
                fb.generate_balanced(ds, "ground_truth", model=model, mode="cells", per_cell=8, run_key="bad",
                                     **kwargs)
        assert not ds.has_run("bad")
    finally:
        ds.delete()


def test_match_tone_gives_edits_their_source_brightness(cells, tmp_path):
    """match_tone: an edit of a one-epoch model (hazy, too bright) gets its source's brightness, hue kept."""
    from fairbalance.generate.diffusion import load_conditional_diffusion, sample_images

    src_ds, model = cells
    diff = load_conditional_diffusion(model)
    x, own, src = _sources(src_ds, diff)
    other = [(c, (a + 1) % len(diff.attributes)) for c, a in own]
    kw = dict(num_inference_steps=4, init_images=x, edit_strength=0.8, attribute_guidance_scale=3.0)
    seeds = list(range(len(own)))
    value_src = src.max(axis=3)
    plain = sample_images(diff, other, seeds, **kw).astype(float)
    by_pixel = sample_images(diff, other, seeds, match_tone="source", **kw).astype(float)
    by_rank = sample_images(diff, other, seeds, match_tone="histogram", **kw).astype(float)
    # without it the one-epoch edits are not as bright as their sources; with it they are
    assert np.abs(plain.max(axis=3) - value_src).mean() > 10
    assert np.abs(by_pixel.max(axis=3) - value_src).max() <= 1.5
    for img, v in zip(by_rank, value_src):  # the same values, by rank: the same brightness histogram
        assert np.abs(np.sort(img.max(axis=2).ravel()) - np.sort(v.ravel())).max() <= 1.5
    # hue and saturation stay the generator's: where both are lit, the chroma is the plain edit's
    lit = (plain.max(axis=3) > 60) & (by_pixel.max(axis=3) > 60)
    chroma = lambda a: a / a.max(axis=3, keepdims=True)  # noqa: E731
    assert np.abs(chroma(plain)[lit] - chroma(by_pixel)[lit]).mean() < 0.05
    # through generate_balanced: recorded, checked before anything is written
    ds = src_ds.clone()
    try:
        res = fb.generate_balanced(ds, "ground_truth", model=model, mode="cells", per_cell=8, source="edit",
                                   inversion=True, match_tone="source", guidance_reference="source",
                                   attribute_guidance_scale=3.0, num_inference_steps=4, realism_sample=0,
                                   output_dir=str(tmp_path / "tone"))
        assert res.num_added > 0
        assert runs.get_run_config(ds, "generate_balanced")["match_tone"] == "source"
        for s in ds.match_tags("generated").select_fields("generation").iter_samples():
            assert s.generation["match_tone"] == "source"
            gen = np.asarray(Image.open(s.filepath).convert("RGB"), dtype=float).max(axis=2)
            source = np.asarray(Image.open(s.generation["source_filepath"]).convert("RGB").resize((16, 16)),
                                dtype=float).max(axis=2)
            assert np.abs(gen - source).max() <= 1.5
        for kwargs, match in [(dict(source="noise", match_tone="source"), "needs source='edit'"),
                              (dict(source="edit", match_tone="mean"), "match_tone must be")]:
            with pytest.raises(FairBalanceError, match=match):
                fb.generate_balanced(ds, "ground_truth", model=model, mode="cells", per_cell=8, run_key="bad",
                                     **kwargs)
        assert not ds.has_run("bad")
    finally:
        ds.delete()
