import fiftyone as fo
import numpy as np
import pytest
from PIL import Image

from fairbalance.core import models, runs
from fairbalance.find import embeddings, related_texts
from fairbalance.find.pseudo_labels import compute_pseudo_labels
from fairbalance.find.sa_features import compute_sa_features, get_related_texts
from fairbalance.core.validation import FairBalanceError


@pytest.fixture
def sa(tiny_clip):
    """compute_sa_features with the tiny CLIP and small k."""

    def run(samples, **kwargs):
        kwargs.setdefault("attribute", "colors")
        kwargs.setdefault("num_related_texts", 5)
        kwargs.setdefault("num_workers", 0)
        return compute_sa_features(samples, model=tiny_clip, pretrained=None, device="cpu", **kwargs)

    return run


def test_attribute_query():
    assert related_texts.attribute_query("races") == "races"
    assert related_texts.attribute_query("races", ["White person", "Black person"]) == \
        "races such as White person, Black person"
    with pytest.raises(FairBalanceError, match="empty"):
        related_texts.attribute_query("  ")


def test_sa_features_shapes_run_and_related_texts(digits_copy, sa, tiny_clip):
    result = sa(digits_copy, attribute="colors", attribute_values=["red", "blue"])
    assert result.query == "colors such as red, blue"
    assert len(result.related_texts) == 5
    assert all(", which means " in r["text"] for r in result.related_texts)
    scores = [r["score"] for r in result.related_texts]
    assert scores == sorted(scores, reverse=True)
    feats = np.stack(digits_copy.values("sa_features"))
    assert feats.shape == (len(digits_copy), 5)
    assert np.all(np.abs(feats) <= 1.0 + 1e-5)
    # features are exactly the cosine similarities of stored image embeddings and the prompted texts
    clip = models.load_clip(tiny_clip, None, device="cpu")
    emb = np.stack(digits_copy.values("clip_embedding"))
    text = clip.encode_text([f"a photo of a {r['text']}" for r in result.related_texts]).numpy()
    assert np.allclose(feats, embeddings.normalize(emb) @ text.T, atol=1e-5)
    cfg = runs.get_run_config(digits_copy, "sa_features")
    assert cfg["model"]["model"] == tiny_clip and cfg["num_related_texts"] == 5
    assert get_related_texts(digits_copy) == result.related_texts


def test_sa_features_deterministic_and_rerun_idempotent(digits_copy, sa):
    sa(digits_copy)
    first = np.stack(digits_copy.values("sa_features"))
    with pytest.raises(FairBalanceError, match="already exists"):
        sa(digits_copy)
    sa(digits_copy, overwrite=True)
    assert np.array_equal(first, np.stack(digits_copy.values("sa_features")))
    assert len(runs.list_runs(digits_copy)) == 1


def test_embeddings_reused_for_new_attribute(digits_copy, sa):
    first = sa(digits_copy)
    assert first.num_encoded == len(digits_copy)
    before = digits_copy.values("clip_embedding")
    second = sa(digits_copy, attribute="digits", run_key="sa_digits", features_field="sa_digits")
    assert second.num_encoded == 0  # no second image encode
    assert all(np.array_equal(a, b) for a, b in zip(before, digits_copy.values("clip_embedding")))
    # a view with new samples only encodes those
    digits_copy.take(5, seed=1).set_field("clip_embedding", None).save()
    third = sa(digits_copy, run_key="sa3", features_field="sa3")
    assert third.num_encoded == 5


def test_features_from_stored_and_new_embeddings(digits_copy, sa, tiny_clip):
    """Features computed chunk by chunk from stored + newly encoded embeddings are cos(text, image)."""
    sa(digits_copy)
    digits_copy.take(5, seed=1).set_field("clip_embedding", None).save()
    result = sa(digits_copy, run_key="sa2", features_field="sa2")
    assert result.num_encoded == 5 and result.num_samples == len(digits_copy)
    clip = models.load_clip(tiny_clip, None, device="cpu")
    text = clip.encode_text([f"a photo of a {r['text']}" for r in result.related_texts]).numpy()
    emb, feats = digits_copy.values(["clip_embedding", "sa2"])
    np.testing.assert_allclose(np.stack(feats), embeddings.normalize(np.stack(emb)) @ text.T, atol=1e-5)


def test_embeddings_load_decodes_what_fiftyone_stored(make_dataset):
    """The one-pass reader returns the view's order, skips samples without a vector, float32, and decodes every
    stored form (float64/float32/float16 vectors, 2-d arrays, lists) exactly as FiftyOne's own values() does."""
    ds = make_dataset()
    vecs = np.random.default_rng(0).standard_normal((10, 4))
    ds.add_samples([fo.Sample(filepath=f"/x/{i}.png", emb=vecs[i] if i % 4 else None) for i in range(10)])
    view = ds.skip(1).sort_by("filepath", reverse=True)
    order = [int(p.split("/")[-1][:-4]) for p in view.values("filepath")]
    view_ids = view.values("id")
    ids, matrix, missing = embeddings.load(view, "emb")
    assert ids == [i for i, k in zip(view_ids, order) if k % 4]
    assert missing == [i for i, k in zip(view_ids, order) if k % 4 == 0]
    assert matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix, vecs[[k for k in order if k % 4]].astype(np.float32))
    for dtype in (np.float32, np.float16):
        ds.set_values("emb_t", [v.astype(dtype) for v in vecs])
        np.testing.assert_array_equal(embeddings.load(ds, "emb_t")[1],
                                      np.stack(ds.values("emb_t")).astype(np.float32))
    ds.set_values("emb_2d", [np.asfortranarray(v.reshape(2, 2)) for v in vecs])  # read as FiftyOne would, flattened
    np.testing.assert_array_equal(embeddings.load(ds, "emb_2d")[1],
                                  np.stack([np.asarray(v).reshape(-1) for v in ds.values("emb_2d")]).astype(np.float32))
    ds.set_values("emb_list", [list(map(float, v)) for v in vecs])
    np.testing.assert_array_equal(embeddings.load(ds, "emb_list")[1], vecs.astype(np.float32))
    ds.set_values("emb_ragged", [v[: 3 + (k % 2)] for k, v in enumerate(vecs)])
    with pytest.raises(FairBalanceError, match="differ in length"):
        embeddings.load(ds, "emb_ragged")


def test_related_text_override_skips_wordnet(digits_copy, sa):
    texts = ["a red digit", "a green digit", "a blue digit"]
    result = sa(digits_copy, attribute=None, related_texts_override=texts)
    assert [r["text"] for r in result.related_texts] == texts and result.query is None
    assert len(digits_copy.first()["sa_features"]) == 3


def test_exclude_words(digits_copy, sa):
    base = sa(digits_copy, num_related_texts=10)
    word = base.related_texts[0]["text"].split(",")[0].split()[0]
    filtered = sa(digits_copy, num_related_texts=10, exclude_words=[word], run_key="sa_ex", features_field="sa_ex")
    assert all(word.lower() not in r["text"].lower().split(",")[0].split() for r in filtered.related_texts)


def test_image_modes_are_converted(make_dataset, sa, tmp_path):
    rng = np.random.RandomState(0)
    rgb = (rng.rand(20, 20, 3) * 255).astype(np.uint8)
    files = {
        "rgb.png": Image.fromarray(rgb),
        "gray.png": Image.fromarray(rgb[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((20, 20), 128, np.uint8)])),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "gray16.png": Image.fromarray((rng.rand(20, 20) * 65535).astype(np.uint16)),
    }
    ds = make_dataset()
    for name, img in files.items():
        img.save(tmp_path / name)
        ds.add_sample(fo.Sample(filepath=str(tmp_path / name)))
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    sa(ds)
    assert all(v is not None and len(v) == 5 for v in ds.values("sa_features"))


def test_corrupt_and_missing_images(make_dataset, sa, tmp_path):
    Image.new("RGB", (10, 10), "red").save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    ds = make_dataset()
    ds.add_samples([fo.Sample(filepath=str(tmp_path / f)) for f in ("ok.png", "bad.png")])
    with pytest.raises(FairBalanceError, match="could not be loaded"):
        sa(ds)
    assert not ds.has_field("sa_features") and not ds.has_field("clip_embedding")
    assert not runs.list_runs(ds)
    result = sa(ds, skip_failures=True)
    assert result.num_samples == 1 and len(result.failures) == 1
    assert ds.count("sa_features") == 1
    ds.add_sample(fo.Sample(filepath=str(tmp_path / "missing.png")))
    with pytest.raises(FairBalanceError, match="not found"):
        sa(ds, overwrite=True)


def test_sa_features_bad_input(digits_copy, sa):
    with pytest.raises(FairBalanceError, match="empty"):
        sa(digits_copy.limit(0))
    with pytest.raises(FairBalanceError, match="empty"):
        sa(digits_copy, attribute="   ")
    with pytest.raises(FairBalanceError, match="num_related_texts"):
        sa(digits_copy, num_related_texts=1)
    with pytest.raises(FairBalanceError, match="at least 2"):
        sa(digits_copy, attribute=None, related_texts_override=["only one"])
    with pytest.raises(models.ModelNotFoundError):
        compute_sa_features(digits_copy, "colors", model="local-dir:/nonexistent")
    assert not digits_copy.has_field("sa_features")


def test_other_model_embeddings_refused(digits_copy, sa, model_dir):
    import tiny_models

    sa(digits_copy)
    other = tiny_models.build_open_clip(str(model_dir / "clip-other"), seed=1)
    with pytest.raises(FairBalanceError, match="holds embeddings from"):
        compute_sa_features(digits_copy, "colors", model=other, pretrained=None, run_key="o", features_field="o",
                            num_related_texts=5, num_workers=0)


def test_pseudo_labels_on_features(digits_copy, sa):
    sa(digits_copy)
    result = compute_pseudo_labels(digits_copy, kmax=8, criterion="bic", backend="sklearn")
    assert 2 <= result.num_clusters <= 8
    counts = digits_copy.count_values("sa_cluster.label")
    assert sum(counts.values()) == len(digits_copy)
    assert {k: v for k, v in counts.items()} == result.counts
    sizes = list(result.counts.values())
    assert sizes == sorted(sizes, reverse=True)  # cluster 0 is the largest
    cfg = runs.get_run_config(digits_copy, "pseudo_labels")
    assert cfg["criterion"] == "bic" and cfg["kmax"] == 8 and cfg["seed"] == 0
    km = compute_pseudo_labels(digits_copy, method="kmeans", num_clusters=4, label_field="km", run_key="km")
    assert km.num_clusters == 4 and digits_copy.distinct("km.label") == ["0", "1", "2", "3"]


def test_pseudo_labels_bad_input(digits_copy, make_dataset):
    with pytest.raises(FairBalanceError, match="not found"):
        compute_pseudo_labels(digits_copy, features_field="nope")
    with pytest.raises(FairBalanceError, match="expected a vector"):
        compute_pseudo_labels(digits_copy, features_field="bias_aligned")
    ds = make_dataset()
    ds.add_samples([fo.Sample(filepath=f"/x/{i}.png", f=np.array([float(i), 1.0])) for i in range(3)])
    with pytest.raises(FairBalanceError, match="fewer than 5 clusters"):
        compute_pseudo_labels(ds, features_field="f", method="kmeans", num_clusters=5)
    s = ds.first()
    s["f"] = np.array([np.nan, 1.0])
    s.save()
    with pytest.raises(FairBalanceError, match="NaN"):
        compute_pseudo_labels(ds, features_field="f")
    with pytest.raises(FairBalanceError, match="kmax"):
        compute_pseudo_labels(ds, features_field="f", kmax=1)
    assert not ds.has_field("sa_cluster")


def test_gloss_tokens_are_the_tokenizers_own_and_cached_per_tokenizer(tiny_clip, tmp_path, monkeypatch):
    """The bank's tokens (open_clip's BPE: ~20 s of CPU for 82k texts) come back from the disk cache exactly as
    the tokenizer makes them; another tokenizer setting is another cache file; the embeddings are unchanged."""
    import copy
    import os

    import torch

    monkeypatch.setenv("FAIRBALANCE_CACHE_DIR", str(tmp_path / "cache"))
    clip = models.load_clip(tiny_clip, None, device="cpu")
    texts = ["dog, which means a domestic animal", "red", "a much longer text " * 30, "ünïcode, which means é"]
    fresh = related_texts.gloss_tokens(clip, texts)
    folder = tmp_path / "cache" / "gloss_tokens"
    assert len(os.listdir(folder)) == 1
    again = related_texts.gloss_tokens(clip, texts)  # read back from the file
    assert again.dtype == fresh.dtype and torch.equal(again, clip.tokenizer(texts)) and torch.equal(fresh, again)
    assert np.array_equal(clip.encode_text(again).numpy(), clip.encode_text(texts).numpy())
    other = copy.copy(clip)
    other.tokenizer = copy.copy(clip.tokenizer)
    other.tokenizer.context_length = 16
    assert torch.equal(related_texts.gloss_tokens(other, texts), other.tokenizer(texts))
    assert len(os.listdir(folder)) == 2
