import os

import fiftyone as fo
import pytest

import tiny_models
from fairbalance.core import runs
from fairbalance.generate.captions import compute_captions, filter_captions, keep_caption, stopwords, top_words
from fairbalance.generate.text_to_image import generate_from_captions
from fairbalance.core.validation import FairBalanceError


@pytest.fixture(scope="module")
def tiny_blip(model_dir):
    return tiny_models.build_blip(str(model_dir / "blip-captions"))


@pytest.fixture(scope="module")
def tiny_sd(model_dir):
    return tiny_models.build_stable_diffusion(str(model_dir / "sd-t2i"))


def test_compute_captions_count_and_determinism(digits_copy, tiny_blip):
    view = digits_copy.limit(6)
    res = compute_captions(view, model=tiny_blip, num_captions=3, batch_size=4, max_new_tokens=6, device="cpu")
    assert res.num_samples == 6
    caps = view.values("captions")
    assert all(isinstance(c, list) and len(c) == 3 for c in caps)
    cfg = runs.get_run_config(digits_copy, "captions")
    assert cfg["num_captions"] == 3 and cfg["model"]["family"] == "transformers"
    compute_captions(view, model=tiny_blip, num_captions=3, batch_size=4, max_new_tokens=6, device="cpu",
                     overwrite=True)
    assert view.values("captions") == caps  # seeded sampling
    with pytest.raises(FairBalanceError, match="already exists"):
        compute_captions(view, model=tiny_blip)


def test_text_filter_rule_on_handwritten_corpus(make_dataset):
    ds = make_dataset()
    corpus = [
        ["a young man smiling", "an old woman in a park"],
        ["a young girl with a hat", "person in pink sweater"],
        ["old lady reading", "the young boy"],
    ]
    for i, caps in enumerate(corpus):
        ds.add_sample(fo.Sample(filepath=f"/x/{i}.png", captions=caps))
    res = filter_captions(ds, top_f=2)
    assert res.top_words == ["young", "old"]  # counts 3 and 2; stopwords removed
    kept = ds.values("filtered_captions")
    assert kept[1] == ["a young girl with a hat"]  # "person in pink sweater" dropped
    assert res.num_dropped == 1 and "person in pink sweater" in res.dropped_examples
    words, counts = top_words(["The cat and the dog", "a cat"], 1, stopwords()[0])
    assert words == ["cat"] and counts["cat"] == 2
    assert keep_caption("Young people", {"young"}) and not keep_caption("youngster", {"young"})


def test_text_filter_defaults_and_bad_input(make_dataset):
    ds = make_dataset()
    ds.add_samples([fo.Sample(filepath=f"/x/{i}.png", captions=[f"red digit {i}", "blue thing"],
                              y=fo.Classification(label=str(i % 2))) for i in range(4)])
    res = filter_captions(ds, label_field="y")  # F = 2 x 2 classes
    assert res.top_words == ["blue", "digit", "red", "thing"]  # 4 each, ties alphabetical; the digits 0-3 never
    assert res.word_counts == {w: 4 for w in res.top_words} and res.run_key == "caption_filter"
    with pytest.raises(FairBalanceError, match="Pass top_f"):
        filter_captions(ds, overwrite=True)
    with pytest.raises(FairBalanceError, match="not found"):
        filter_captions(ds, caption_field="nope", top_f=2)
    empty = make_dataset()
    empty.add_samples([fo.Sample(filepath="/x/a.png", captions=["the a an"])])
    with pytest.raises(FairBalanceError, match="nothing kept"):
        filter_captions(empty, top_f=2)
    assert not empty.has_field("filtered_captions")


def test_generate_from_captions_provenance_idempotent_resume(digits_copy, tiny_sd, tmp_path):
    view = digits_copy.limit(3)
    view.set_values("filtered_captions", [["a red digit zero"], ["a green digit", "a blue digit"], []])
    out = str(tmp_path / "t2i")
    kwargs = dict(model=tiny_sd, output_dir=out, num_inference_steps=2, height=16, width=16, device="cpu",
                  safety_checker=False, batch_size=2)
    res = generate_from_captions(view, **kwargs)
    assert res.num_added == 3
    gen = digits_copy.match_tags("generated")
    assert len(gen) == 3 and all(os.path.isfile(p) for p in gen.values("filepath"))
    s = gen.first()
    src = digits_copy[s.generation["source_id"]]
    assert s.generated and s.ground_truth.label == src.ground_truth.label
    assert s.generation["prompt"] in src.filtered_captions and s.generation["model"]["family"] == "diffusers"
    again = generate_from_captions(view, **kwargs)
    assert again.num_added == 0 and len(digits_copy.match_tags("generated")) == 3
    victim = gen.first()
    os.remove(victim.filepath)
    digits_copy.delete_samples(victim)
    resumed = generate_from_captions(view, **kwargs)
    assert resumed.num_added == 1 and len(digits_copy.match_tags("generated")) == 3


def test_generate_from_captions_bad_input(digits_copy, tiny_sd, tmp_path):
    with pytest.raises(FairBalanceError, match="not found"):
        generate_from_captions(digits_copy, caption_field="nope", model=tiny_sd)
    digits_copy.limit(2).set_values("caps", [[], []])
    with pytest.raises(FairBalanceError, match="nothing to generate"):
        generate_from_captions(digits_copy.limit(2), caption_field="caps", model=tiny_sd)
    from fairbalance.core.models import ModelNotFoundError

    digits_copy.limit(1).set_values("caps", [["x"]])
    with pytest.raises(ModelNotFoundError):
        generate_from_captions(digits_copy.limit(1), caption_field="caps", model="/nonexistent/sd",
                               output_dir=str(tmp_path / "o"))
    long = " ".join(["word"] * 100)
    digits_copy.limit(1).set_values("caps", [[long]])
    with pytest.warns(UserWarning, match="truncated"):
        generate_from_captions(digits_copy.limit(1), caption_field="caps", model=tiny_sd, num_inference_steps=1,
                               height=16, width=16, output_dir=str(tmp_path / "long"), safety_checker=False)


def test_caption_operators_match_sdk(digits_dataset, tiny_blip, tiny_sd, tmp_path):
    import fiftyone.operators as foo

    op_ds, sdk_ds = digits_dataset.limit(4).clone(), digits_dataset.limit(4).clone()
    try:
        res = foo.execute_operator("@fairbalance/fairbalance/compute_captions", ctx={
            "dataset": op_ds.name, "params": {"model": tiny_blip, "num_captions": 2, "batch_size": 4}})
        assert res.error is None, res.error
        compute_captions(sdk_ds, model=tiny_blip, num_captions=2, batch_size=4)
        assert op_ds.values("captions") == sdk_ds.values("captions")
        op_ds.set_values("captions", [["a red digit", "a blue digit"]] * 4)
        res = foo.execute_operator("@fairbalance/fairbalance/filter_captions", ctx={
            "dataset": op_ds.name, "params": {"caption_field": "captions", "top_f": 1}})
        assert res.error is None, res.error
        assert res.result["top_words"] == ["digit"] and res.result["num_kept"] == 8
        res = foo.execute_operator("@fairbalance/fairbalance/generate_from_captions", ctx={
            "dataset": op_ds.name, "params": {"caption_field": "filtered_captions", "model": tiny_sd,
                                              "num_inference_steps": 1, "safety_checker": False,
                                              "label_field": "ground_truth"}})
        assert res.error is None, res.error
        assert res.result["num_added"] == 8 and len(op_ds.match_tags("generated")) == 8
    finally:
        op_ds.delete()
        sdk_ds.delete()
