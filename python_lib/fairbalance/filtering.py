"""Scoring generated samples against their condition with CLIP, and tagging the worst (Clustered DreamBooth)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fairbalance import claims, models, runs, validation


@claims.exclusive
def filter_generated(
    samples,
    label_field: str = "sa_cluster",
    embeddings_field: str = "clip_embedding",
    score_field: str = "generation_score",
    tag: str = "low_quality",
    threshold: float | None = None,
    bottom_fraction: float | None = 0.1,
    method: str = "clip",
    texts: dict[str, str] | None = None,
    batch_size: int = 64,
    device: str | None = None,
    run_key: str = "filter_generated",
    overwrite: bool = False,
    progress=None,
) -> "FilterResult":
    """Score generated images by CLIP similarity to their cluster and tag the worst (Clustered DreamBooth).

    The condition of cluster c is the centroid of the stored CLIP embeddings
    of the *real* samples of c (same model as ``embeddings_field``), or, with
    ``texts`` (cluster -> text, e.g. a caption that describes the cluster),
    the CLIP embedding of that text. Each generated image is scored by cosine
    similarity to its condition, stored in ``score_field``, and tagged
    ``tag`` when below ``threshold`` or in the ``bottom_fraction``.
    Retagging replaces the previous tags. ``method``: only ``"clip"``.
    """
    from fiftyone import ViewField as Fv

    from fairbalance import embeddings
    from fairbalance.balance import label_path

    validation.require_nonempty(samples)
    validation.require_fields(samples, [label_field, embeddings_field, "generated"])
    if (threshold is None) == (bottom_fraction is None):
        raise validation.FairBalanceError("pass exactly one of threshold or bottom_fraction")
    if bottom_fraction is not None and not (isinstance(bottom_fraction, (int, float)) and 0 < bottom_fraction < 1):
        raise validation.FairBalanceError(f"bottom_fraction must be in (0, 1), got {bottom_fraction!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and np.isfinite(threshold)):
        raise validation.FairBalanceError(f"threshold must be a finite number, got {threshold!r}")
    if method != "clip":
        raise validation.FairBalanceError(f"method must be 'clip', not {method!r}")
    spec = embeddings.stored_model(samples, embeddings_field)
    if spec is None:
        raise validation.FairBalanceError(f"'{embeddings_field}' was not written by fairbalance; no model recorded")
    path = label_path(samples, label_field)
    gen = samples.match(Fv("generated") == True)  # noqa: E712
    real = samples.match(Fv("generated") != True)  # noqa: E712
    if len(gen) == 0:
        raise validation.FairBalanceError("The view has no generated samples")
    if texts is not None:
        texts = {str(c): t for c, t in texts.items()}
        lacking = sorted(set(gen.distinct(path)) - set(texts))
        empty = sorted(c for c, t in texts.items() if not (isinstance(t, str) and t.strip()))
        if lacking or empty:
            raise validation.FairBalanceError(
                "texts must give a non-empty text for every cluster of the generated samples; "
                f"missing: {lacking}, empty: {empty}")
    run = runs.prepare(samples, run_key, "filter_generated", {
        "label_field": label_field, "embeddings_field": embeddings_field, "threshold": threshold,
        "bottom_fraction": bottom_fraction, "tag": tag, "model": spec, "score_method": method,
        "texts": sorted(texts.items()) if texts is not None else None},
        [score_field], overwrite)
    clip = models.load_clip(spec["model"], spec["pretrained"], device=device)
    new, _ = embeddings.compute_missing(gen, embeddings_field, clip, batch_size, progress=progress)
    dataset = samples._root_dataset
    previous_tag = previous_tagged = None
    if dataset.has_run(run_key):
        previous_tag = runs.get_run_config(dataset, run_key).get("tag")
        previous_tagged = runs.load_run_results(dataset, run_key).get("tagged_ids")
    centroids = {}
    if texts is not None:
        names = sorted(texts)
        for c, vec in zip(names, clip.encode_text([texts[c] for c in names]).numpy()):
            centroids[c] = vec
    else:
        for c in real.distinct(path):
            _, emb, _ = embeddings.load(real.match(Fv(path) == c), embeddings_field)
            if len(emb):
                centroids[c] = embeddings.normalize(emb.mean(0, keepdims=True))[0]
    gids, glabels, gstored = gen.values(["id", path, embeddings_field])
    scores = {}
    for i, c, e in zip(gids, glabels, gstored):
        vec = new.get(i) if new.get(i) is not None else e
        if c in centroids and vec is not None:
            scores[i] = float(embeddings.normalize(np.asarray(vec)[None])[0] @ centroids[c])
    if not scores:
        raise validation.FairBalanceError("No generated sample has a cluster with real embeddings to compare to")
    values = np.array(list(scores.values()))
    cut = threshold if threshold is not None else float(np.quantile(values, bottom_fraction))
    low = [i for i, v in scores.items() if v < cut or (threshold is None and v <= cut)]

    def write():
        embeddings.write(gen, embeddings_field, new, clip)
        gen.select(list(scores)).set_values(score_field, scores, key_field="id")
        if previous_tag and previous_tagged:  # only what this run tagged before, never other samples
            samples._root_dataset.select(previous_tagged).untag_samples(previous_tag)
        samples.select(low).tag_samples(tag)

    run.write(write)
    result = FilterResult(run_key, score_field, tag, len(scores), len(low), cut, float(values.mean()))
    run.save_results({**result.to_dict(), "tagged_ids": low})
    return result


@dataclass
class FilterResult:
    """How many generated samples were scored and tagged, at which cut."""

    run_key: str
    score_field: str
    tag: str
    num_scored: int
    num_tagged: int
    cut: float
    mean_score: float

    def to_dict(self) -> dict:
        return asdict(self)
