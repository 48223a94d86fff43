"""Scoring generated samples against their condition with CLIP, and acting on the worst (Clustered DreamBooth).

Every generated sample is scored by its similarity to its cluster (CLIP, or
pixels when no CLIP weights are at hand); the worst are tagged and, with
``action="exclude"``, marked so that training on generated samples leaves
them out, or with ``action="weight"`` every scored sample gets a weight
derived from its score that training uses as its loss weight.

``method="discriminator"`` needs no cluster, caption or bias label: a small
real-vs-generated discriminator (:mod:`fairbalance.generate.realism`) scores each
generated image by its held-out p(real | x); the most separable are tagged,
and weights are the density ratio p(real | x) / p(generated | x).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fairbalance.core import models, runs, validation
from fairbalance.core.data import load_images, native_size

ACTIONS = ("tag", "exclude", "weight")
SCORE_METHODS = ("clip", "pixels", "discriminator")


@runs.writer("filter_generated")
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
    action: str = "tag",
    exclude_field: str = "filtered_out",
    weight_field: str = "generation_weight",
    folds: int = 5,
    epochs: int = 10,
    max_weight: float = 10.0,
    seed: int = 0,
    within: str | None = None,
) -> "FilterResult":
    """Score generated images by CLIP similarity to their cluster; tag the worst, and exclude or weight them.

    The condition of cluster c is the centroid of the stored CLIP embeddings
    of the *real* samples of c (same model as ``embeddings_field``), or, with
    ``texts`` (cluster -> text, e.g. a caption that describes the cluster),
    the CLIP embedding of that text. Each generated image is scored by cosine
    similarity to its condition, stored in ``score_field``, and tagged
    ``tag`` when below ``threshold`` or in the ``bottom_fraction``.
    Retagging replaces the previous tags.

    ``action``: ``"tag"`` (only the tag); ``"exclude"`` also writes
    ``exclude_field`` (True for the tagged, False for the other scored
    samples), which ``train_classifier`` (``synthetic``, ``two_stage``,
    whose ``exclude_field`` defaults to the same name) leaves out;
    ``"weight"`` also writes ``weight_field``: each scored sample's
    percentile rank among the scored ones, in (0, 1] (the best 1.0), to
    pass as ``train_classifier(weight_field=...)``. ``method``: ``"clip"``,
    or ``"pixels"`` (no CLIP weights needed, much weaker: cosine similarity
    of the mean-centred pixels to the centroid of the cluster's real
    images; ``embeddings_field`` and ``texts`` are not used), or
    ``"discriminator"`` (realism, no label needed: ``label_field``,
    ``embeddings_field`` and ``texts`` are not used): LfF's MLP trained to
    tell the view's real images from its generated ones, cross-fitted over
    ``folds`` (each image scored by a model that never saw it, ``epochs``
    each, class-balanced), score = p(real | x), so the lowest scores are
    the most separable; with ``action="weight"`` the weight is the density
    ratio p(real | x) / p(generated | x), clipped at ``max_weight`` and
    scaled to mean 1 over the generated samples (their total weight stays
    their count). The run's results hold the two-sample accuracy. ``within``
    (a field, e.g. ``"generation.cell"``): the ``bottom_fraction`` is cut in
    each of its groups, so every cell keeps its most realistic share.
    """
    from fairbalance.find import embeddings

    spec, path, gen, real, texts = _check_inputs(samples, label_field, embeddings_field, score_field, tag, threshold,
                                                 bottom_fraction, method, texts, action, exclude_field, weight_field,
                                                 folds, epochs, max_weight, within)
    extra = [exclude_field] if action == "exclude" else [weight_field] if action == "weight" else []
    run = runs.prepare(samples, run_key, "filter_generated", _run_config(
        label_field, embeddings_field, threshold, bottom_fraction, tag, spec, method, texts, action, exclude_field,
        weight_field, folds, epochs, max_weight, seed, within), [score_field] + extra, overwrite)
    scores, separability, clip, new = _scores(method, real, gen, path, spec, texts, embeddings_field, batch_size,
                                              folds, epochs, seed, device, progress)
    previous_tag, previous_tagged = _previous_tagging(samples._root_dataset, run_key)
    if not scores:
        raise validation.FairBalanceError("No generated sample has a cluster with real embeddings to compare to")
    values = np.array(list(scores.values()))
    cut, low, weights = _cut_and_weights(scores, values, threshold, bottom_fraction, method, max_weight,
                                         dict(zip(*gen.values(["id", within]))) if within else None)
    low_set = set(low)

    def write():
        if clip is not None:
            embeddings.write(gen, embeddings_field, new, clip)
        scored = gen.select(list(scores))
        scored.set_values(score_field, scores, key_field="id")
        if action == "exclude":
            scored.set_values(exclude_field, {i: i in low_set for i in scores}, key_field="id")
        elif action == "weight":
            scored.set_values(weight_field, weights, key_field="id")
        if previous_tag and previous_tagged:  # only what this run tagged before, never other samples
            samples._root_dataset.select(previous_tagged).untag_samples(previous_tag)
        had = set(samples._root_dataset.select(low).match_tags(tag).values("id")) if low else set()
        tagged[:] = [i for i in low if i not in had]  # a user's own tag is not this run's to remove later
        samples.select(low).tag_samples(tag)

    tagged: list[str] = []
    run.write(write)
    result = FilterResult(run_key, score_field, tag, len(scores), len(low), cut, float(values.mean()), action,
                          exclude_field if action == "exclude" else None, weight_field if action == "weight" else None,
                          len(low) if action == "exclude" else 0,
                          float(np.mean(list(weights.values()))) if action == "weight" else None, separability)
    run.save_results({**result.to_dict(), "tagged_ids": tagged})
    return result


def _previous_tagging(dataset, run_key: str):
    """The tag and the ids an earlier run of ``run_key`` tagged (None, None without one)."""
    if not dataset.has_run(run_key):
        return None, None
    return runs.get_run_config(dataset, run_key).get("tag"), runs.load_run_results(dataset, run_key).get("tagged_ids")


def _check_inputs(samples, label_field, embeddings_field, score_field, tag, threshold, bottom_fraction, method, texts,
                  action, exclude_field, weight_field, folds, epochs, max_weight, within=None):
    """Every input checked before anything is written; the embedding model recorded for ``embeddings_field``, the
    label path, the generated and the real samples, and ``texts`` keyed by cluster name."""
    from fiftyone import ViewField as Fv

    from fairbalance.core.fields import label_path
    from fairbalance.find import embeddings

    validation.require_nonempty(samples)
    validation.require_tag("tag", tag)
    _check_method(action, method, texts, folds, epochs, max_weight)
    extra = [exclude_field] if action == "exclude" else [weight_field] if action == "weight" else []
    if len({score_field, *extra}) != 1 + len(extra):
        raise validation.FairBalanceError("score_field and the exclude / weight field must differ")
    validation.require_fields(samples, ["generated"] + ([label_field] if method != "discriminator" else [])
                              + ([embeddings_field] if method == "clip" else []))
    if (threshold is None) == (bottom_fraction is None):
        raise validation.FairBalanceError("pass exactly one of threshold or bottom_fraction")
    if within is not None:
        if not isinstance(within, str) or bottom_fraction is None:
            raise validation.FairBalanceError(f"within must be a field name used with bottom_fraction, not {within!r}")
        validation.require_fields(samples, [within])
    if bottom_fraction is not None and not (isinstance(bottom_fraction, (int, float)) and 0 < bottom_fraction < 1):
        raise validation.FairBalanceError(f"bottom_fraction must be in (0, 1), got {bottom_fraction!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and np.isfinite(threshold)):
        raise validation.FairBalanceError(f"threshold must be a finite number, got {threshold!r}")
    spec = embeddings.stored_model(samples, embeddings_field) if method == "clip" else {method: True}
    if spec is None:
        raise validation.FairBalanceError(f"'{embeddings_field}' was not written by fairbalance; no model recorded")
    path = label_path(samples, label_field) if method != "discriminator" else None
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
    if method == "discriminator" and len(real) < folds:
        raise validation.FairBalanceError(f"method='discriminator' needs at least {folds} real samples in the view")
    if method == "discriminator" and len(gen) < folds:
        raise validation.FairBalanceError(f"method='discriminator' needs at least {folds} generated samples")
    return spec, path, gen, real, texts


def _scores(method, real, gen, path, spec, texts, embeddings_field, batch_size, folds, epochs, seed, device, progress):
    """Each generated sample's score (the discriminator's p(real | x), or its similarity to its cluster's condition),
    the two-sample separability (discriminator), and the CLIP model with the embeddings it computed (clip)."""
    from fairbalance.find import embeddings

    separability = None
    if method == "discriminator":
        scores, separability = _discriminator_scores(real, gen, folds, epochs, seed, device)
        return scores, separability, None, {}
    if method == "pixels":
        clip, new = None, {}
        centroids, vectors = _pixel_vectors(real, gen, path)
    else:
        clip = models.load_clip(spec["model"], spec["pretrained"], device=device)
        new, _ = embeddings.compute_missing(gen, embeddings_field, clip, batch_size, progress=progress)
        centroids, vectors = _clip_centroids(clip, texts, real, path, embeddings_field), None
    return _similarities(gen, path, centroids, clip, new, vectors, embeddings_field), separability, clip, new


def _run_config(label_field, embeddings_field, threshold, bottom_fraction, tag, spec, method, texts, action,
                exclude_field, weight_field, folds, epochs, max_weight, seed, within=None) -> dict:
    """The run's config: the settings that apply to ``method`` and ``action`` (None for the others)."""
    return {
        "label_field": label_field if method != "discriminator" else None,
        "embeddings_field": embeddings_field if method == "clip" else None, "threshold": threshold,
        "bottom_fraction": bottom_fraction, "tag": tag, "model": spec, "score_method": method,
        "texts": sorted(texts.items()) if texts is not None else None, "action": action,
        "exclude_field": exclude_field if action == "exclude" else None,
        "weight_field": weight_field if action == "weight" else None,
        **({"folds": int(folds), "epochs": int(epochs), "max_weight": float(max_weight), "seed": seed}
           if method == "discriminator" else {}),
        **({"within": within} if within else {})}  # recorded only when on: earlier runs still match


def _check_method(action, method, texts, folds, epochs, max_weight) -> None:
    """The action, the scoring method and the discriminator's settings."""
    if action not in ACTIONS:
        raise validation.FairBalanceError(f"action must be one of {ACTIONS}, not {action!r}")
    if method not in SCORE_METHODS:
        raise validation.FairBalanceError(f"method must be 'clip', 'pixels' or 'discriminator', not {method!r}")
    if method != "clip" and texts is not None:
        raise validation.FairBalanceError(f"texts are scored with CLIP: method='{method}' compares images only")
    if method == "discriminator":
        validation.require_positive_int("folds", folds, 2)
        validation.require_positive_int("epochs", epochs)
        if isinstance(max_weight, bool) or not (isinstance(max_weight, (int, float)) and np.isfinite(max_weight)
                                                and max_weight >= 1):
            raise validation.FairBalanceError(f"max_weight must be a finite number >= 1, got {max_weight!r}")


def _clip_centroids(clip, texts, real, path, embeddings_field) -> dict:
    """Each cluster's condition: the CLIP embedding of its text, or the centroid of its real samples' embeddings."""
    from fiftyone import ViewField as Fv

    from fairbalance.find import embeddings

    centroids = {}
    if texts is not None:
        names = sorted(texts)
        for c, vec in zip(names, clip.encode_text([texts[c] for c in names]).numpy()):
            centroids[c] = vec
        return centroids
    for c in real.distinct(path):
        _, emb, _ = embeddings.load(real.match(Fv(path) == c), embeddings_field)
        if len(emb):
            centroids[c] = embeddings.normalize(emb.mean(0, keepdims=True))[0]
    return centroids


def _similarities(gen, path, centroids, clip, new, vectors, embeddings_field) -> dict:
    """Each generated sample's cosine similarity to its cluster's condition (CLIP embeddings, or pixel vectors)."""
    from fairbalance.find import embeddings

    if clip is None:
        gids, glabels = gen.values(["id", path])
        gstored = [vectors[i] for i in gids]
    else:
        gids, glabels, gstored = gen.values(["id", path, embeddings_field])
    scores = {}
    for i, c, e in zip(gids, glabels, gstored):
        vec = new.get(i) if new.get(i) is not None else e
        if c in centroids and vec is not None:
            scores[i] = float(embeddings.normalize(np.asarray(vec)[None])[0] @ centroids[c])
    return scores


def _cut_and_weights(scores: dict, values: np.ndarray, threshold, bottom_fraction, method, max_weight, groups=None):
    """The cut, the ids below it (per group of ``groups``, id -> group, when given) and every scored sample's
    weight (percentile rank, or the discriminator's density ratio p(real|x) / p(gen|x), clipped, mean 1)."""
    cut = threshold if threshold is not None else float(np.quantile(values, bottom_fraction))
    low = [i for i, v in scores.items() if v < cut or (threshold is None and v <= cut)]
    ranks = np.argsort(np.argsort(values, kind="stable"), kind="stable")
    weights = {i: float((r + 1) / len(values)) for i, r in zip(scores, ranks)}
    if method == "discriminator":
        p = np.clip(values, 1e-6, 1 - 1e-6)
        ratio = np.minimum(p / (1 - p), max_weight)
        ratio = ratio / ratio.mean()
        weights = {i: float(r) for i, r in zip(scores, ratio)}
    if groups is not None:
        cut, low = _lowest_within(scores, groups, bottom_fraction)
    return cut, low, weights


def _lowest_within(scores: dict, groups: dict, bottom_fraction: float):
    """The lowest-scored ``floor(n x bottom_fraction)`` ids of each group, and the highest score among them."""
    by_group: dict = {}
    for i in scores:
        by_group.setdefault(str(groups.get(i)), []).append(i)
    low = []
    for ids in by_group.values():
        ids.sort(key=lambda i: scores[i])
        low += ids[:int(np.floor(len(ids) * bottom_fraction + 1e-9))]
    return (max(scores[i] for i in low) if low else min(scores.values())), low


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
    action: str = "tag"
    exclude_field: str | None = None  # "exclude": the field training reads to leave the tagged samples out
    weight_field: str | None = None  # "weight": pass as train_classifier(weight_field=...)
    num_excluded: int = 0
    mean_weight: float | None = None
    two_sample_accuracy: float | None = None  # "discriminator": held-out real-vs-generated accuracy (0.5 = real)

    def to_dict(self) -> dict:
        return asdict(self)


def _pixel_vectors(real, gen, path: str):
    """Per-cluster centroids of the real images' mean-centred pixels, and every generated image's vector."""
    from fairbalance.find import embeddings

    rpaths, rlabels = real.values(["filepath", path])
    keep = [j for j, c in enumerate(rlabels) if c is not None]
    gids, gpaths = gen.values(["id", "filepath"])
    if not keep:
        raise validation.FairBalanceError("No real sample has a cluster label to compare the generated ones to")
    size = native_size([rpaths[keep[0]]])
    xr = load_images([rpaths[j] for j in keep], size, progress=False).flatten(1).numpy()
    mean = xr.mean(0, keepdims=True)
    labels = np.array([str(rlabels[j]) for j in keep])
    centroids = {c: embeddings.normalize((xr[labels == c] - mean).mean(0, keepdims=True))[0]
                 for c in sorted(set(labels))}
    xg = load_images(gpaths, size, progress=False).flatten(1).numpy() - mean
    return centroids, dict(zip(gids, xg))


def _discriminator_scores(real, gen, folds: int, epochs: int, seed: int, device) -> tuple[dict, float]:
    """Held-out p(real | x) of every generated sample, and the two-sample accuracy (:mod:`fairbalance.generate.realism`)."""
    from fairbalance.generate import realism

    gids, gpaths = gen.values(["id", "filepath"])
    rpaths = real.values("filepath")
    size = native_size(rpaths[:1])
    xr = load_images(rpaths, size, progress=False)
    xg = load_images(gpaths, size, progress=False)
    pr, pg = realism.discriminator_scores(xr, xg, folds, epochs, "mlp", seed, device)
    return dict(zip(gids, (float(v) for v in pg))), realism.two_sample_accuracy(pr, pg)
