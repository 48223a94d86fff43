"""Sensitive-attribute (SA) features from a text-specified attribute (Suayama & Nakamura, III-A/B).

``f_j = (cos(TE(w_i), VE(x_j)))_{i=1..k}``: the cosine similarities of each
image's CLIP embedding to k related texts, stored per sample as a vector.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from fairbalance.core import models, runs, sharding, validation, writeback
from fairbalance.find import embeddings, related_texts

FEATURES_CHUNK = 65_536


@dataclass
class SAFeaturesResult:
    """What a :func:`compute_sa_features` call chose and wrote."""

    run_key: str
    query: str | None
    related_texts: list[dict]
    num_samples: int
    num_encoded: int
    features_field: str
    embeddings_field: str
    failures: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@runs.writer("sa_features")
def compute_sa_features(
    samples,
    attribute: str | None = None,
    attribute_values: list[str] | None = None,
    related_texts_override: list[str] | None = None,
    num_related_texts: int = 20,
    exclude_words: list[str] | None = None,
    prompt_template: str = "a photo of a {}",
    model: str = "ViT-B-32",
    pretrained: str | None = "openai",
    embeddings_field: str = "clip_embedding",
    features_field: str = "sa_features",
    run_key: str = "sa_features",
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | None = None,
    skip_failures: bool = False,
    overwrite: bool = False,
    shard: int | None = None,
    num_shards: int | None = None,
    chunk_size: int = sharding.DEFAULT_CHUNK_SIZE,
    progress=None,
) -> SAFeaturesResult | sharding.ShardResult:
    """Compute and store SA features for every sample of ``samples``.

    Args:
        attribute: the sensitive attribute, e.g. ``"races"``
        attribute_values: optional values, e.g. ``["white person", "black person"]``
        related_texts_override: use these texts instead of choosing from WordNet
            (the paper's "ideal related texts")
        num_related_texts: k, the number of WordNet related texts (>= 2)
        exclude_words: drop candidate texts containing any of these words
        prompt_template: how each related text is phrased for the image
            comparison (the paper: "a photo of a yellow race, which means ...")
        model, pretrained: the CLIP model (see :func:`fairbalance.core.models.load_clip`)
        embeddings_field: where CLIP image embeddings are kept; samples that
            already have one from the same model are not encoded again
        features_field: the k-vector field to write
        skip_failures: leave unreadable images without features instead of failing
        shard, num_shards: compute only shard ``shard`` of ``num_shards`` (see
            :mod:`fairbalance.core.sharding`; :func:`fairbalance.queue_sharded` queues
            all shards for delegated workers): chunks of ``chunk_size`` samples
            are written as they finish, a rerun skips the samples done, and the
            last shard to finish records the run; returns a
            :class:`~fairbalance.core.sharding.ShardResult`
    """
    related_texts_override = validate_inputs(samples, attribute, attribute_values, related_texts_override,
                                             num_related_texts, prompt_template, embeddings_field, features_field,
                                             batch_size, device)
    sharded = sharding.one_shard_requested(shard, num_shards, overwrite)
    if sharded:
        sharding.require_same_weights_everywhere("compute_sa_features", {"model": model, "pretrained": pretrained})

    clip = models.load_clip(model, pretrained, device=device)
    embeddings.check_field(samples, embeddings_field, clip)
    config = {
        "model": clip.spec.to_dict(),
        "attribute": attribute,
        "attribute_values": attribute_values,
        "related_texts_override": related_texts_override,
        "num_related_texts": num_related_texts,
        "exclude_words": exclude_words,
        "prompt_template": prompt_template,
        "embeddings_field": embeddings_field,
        "features_field": features_field,
        "skip_failures": skip_failures,
    }
    if sharded:
        return _compute_shard(samples, clip, config, run_key, shard, num_shards, chunk_size, batch_size, num_workers,
                              progress)
    run = runs.prepare(samples, run_key, "sa_features", config, [features_field], overwrite)

    texts = _choose_texts(clip, config)

    new, failures = embeddings.compute_missing(
        samples, embeddings_field, clip, batch_size, num_workers, skip_failures, progress
    )
    target_ids, features = _features(samples, embeddings_field, new, clip, texts, prompt_template)

    def write():
        embeddings.write(samples, embeddings_field, new, clip)
        values = {i: features[j] for j, i in enumerate(target_ids)}
        # keyed by id, no select(target_ids): a $in of 1M ids is over MongoDB's 16 MB command limit
        writeback.set_values_by_id(samples, {features_field: values}, ids=target_ids)
        if failures:  # samples that could not be loaded get no stale features
            samples.select(list(failures)).set_field(features_field, None).save()

    run.write(write)
    result = SAFeaturesResult(
        run_key=run_key,
        query=texts["query"],
        related_texts=texts["related_texts"],
        num_samples=len(target_ids),
        num_encoded=len(new),
        features_field=features_field,
        embeddings_field=embeddings_field,
        failures=failures,
    )
    run.save_results({k: v for k, v in result.to_dict().items() if k != "run_key"})
    return result


def _features(samples, embeddings_field, new: dict, clip, texts: dict, prompt_template: str):
    """The ids with an embedding (a new one takes precedence over a stored one) and their SA features: cosine
    similarities of each image embedding to the related texts."""
    ids, stored, _ = (embeddings.load(samples, embeddings_field)
                      if samples._root_dataset.has_field(embeddings_field) else ([], None, []))
    row = {i: j for j, i in enumerate(ids)}  # stored embedding of each sample; a new one takes precedence
    target_ids = [i for i in samples.values("id") if i in new or i in row]
    if not target_ids:
        raise validation.FairBalanceError("No image could be encoded; nothing written")
    text_emb = clip.encode_text([prompt_template.format(r["text"]) for r in texts["related_texts"]]).numpy()
    # chunk by chunk, so that the embeddings are never copied whole (1M x 512 float32 is 2 GB)
    features = np.empty((len(target_ids), len(text_emb)), dtype=np.float32)
    for s in range(0, len(target_ids), FEATURES_CHUNK):
        block = np.stack([new[i] if i in new else stored[row[i]] for i in target_ids[s : s + FEATURES_CHUNK]])
        features[s : s + len(block)] = embeddings.normalize(block) @ text_emb.T
    return target_ids, features


def validate_inputs(samples, attribute=None, attribute_values=None, related_texts_override=None,
                    num_related_texts=20, prompt_template="a photo of a {}", embeddings_field="clip_embedding",
                    features_field="sa_features", batch_size=64, device=None, **_):
    """The up-front checks of :func:`compute_sa_features` (also run by ``queue_sharded`` before queuing).

    Returns the cleaned ``related_texts_override``.
    """
    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    validation.require_field_name(embeddings_field)
    validation.require_field_name(features_field)
    validation.require_positive_int("batch_size", batch_size)
    validation.require_device(device)
    if features_field == embeddings_field:
        raise validation.FairBalanceError(
            f"features_field and embeddings_field are both '{features_field}': the features would replace the "
            "CLIP embeddings; choose two names")
    if related_texts_override is None:
        related_texts.attribute_query(attribute, attribute_values)  # validates the attribute text
        validation.require_positive_int("num_related_texts", num_related_texts, minimum=2)
    else:
        related_texts_override = [t.strip() for t in related_texts_override if t and t.strip()]
        if len(related_texts_override) < 2:
            raise validation.FairBalanceError("Pass at least 2 non-empty related texts")
    if "{}" not in prompt_template:
        raise validation.FairBalanceError("prompt_template must contain '{}' where the related text goes")
    return related_texts_override


def _choose_texts(clip, config) -> dict:
    """``{"query", "related_texts"}``: the WordNet texts closest to the attribute, or the user's own texts."""
    if config["related_texts_override"] is None:
        query, chosen = related_texts.select(clip, config["attribute"], config["attribute_values"],
                                             config["num_related_texts"], config["exclude_words"], progress=False)
    else:
        query, chosen = None, [related_texts.RelatedText(t, None) for t in config["related_texts_override"]]
    return {"query": query, "related_texts": [{"text": r.text, "score": r.score, "synset": r.synset} for r in chosen]}


def _compute_shard(samples, clip, config, run_key, shard, num_shards, chunk_size, batch_size, num_workers,
                   progress) -> sharding.ShardResult:
    """One shard of a sharded SA-features run: chunks of images encoded and written as they finish."""
    import fiftyone.core.utils as fou

    emb_field, feat_field = config["embeddings_field"], config["features_field"]
    job = sharding.Shard(samples, run_key, "compute_sa_features", shard, num_shards, config, [feat_field],
                         done_field=feat_field, chunk_size=chunk_size)
    # every shard uses the texts the first one chose (WordNet selection is deterministic, but once is enough)
    texts = job.shared("texts", lambda: _choose_texts(clip, config))
    text_emb = clip.encode_text([config["prompt_template"].format(r["text"]) for r in texts["related_texts"]]).numpy()
    dataset = samples._root_dataset
    with fou.ProgressBar(total=max(job.total, 1), progress=progress) as pb:
        pb.update(job.resumed)
        for chunk in job.chunks():
            view = dataset.select(chunk)
            new, failures = embeddings.compute_missing(view, emb_field, clip, batch_size, num_workers,
                                                       config["skip_failures"])
            ids, stored, _ = embeddings.load(view, emb_field) if dataset.has_field(emb_field) else ([], None, [])
            by_id = dict(zip(ids, stored)) if ids else {}
            by_id.update(new)
            target = [i for i in chunk if i in by_id]
            embeddings.write(dataset, emb_field, new, clip)
            if target:
                features = embeddings.normalize(np.stack([by_id[i] for i in target])) @ text_emb.T
                writeback.set_values_by_id(dataset.select(target), {
                    feat_field: {i: features[j].astype(np.float32) for j, i in enumerate(target)}}, ids=target)
            job.chunk_done(chunk, failures, counts={"num_encoded": len(new)})
            pb.update(len(chunk))
    return job.finish()


def merge_shards(samples, job: dict) -> dict:
    """The results of a sharded SA-features run whose shards are all done (what the run record keeps)."""
    cfg = job["config"]
    shards = job["shards"].values()
    failures = {k: v for s in shards for k, v in (s.get("failures") or {}).items()}
    texts = job["shared"]["texts"]
    return {
        "query": texts["query"],
        "related_texts": texts["related_texts"],
        "num_samples": len(samples.exists(cfg["features_field"])),
        "num_encoded": sum((s.get("counts") or {}).get("num_encoded", 0) for s in shards),  # every attempt's
        "features_field": cfg["features_field"],
        "embeddings_field": cfg["embeddings_field"],
        "failures": failures,
    }


def get_related_texts(samples, run_key: str = "sa_features") -> list[dict]:
    """The related texts (and scores) chosen by an SA-features run."""
    return runs.load_run_results(samples, run_key).get("related_texts", [])
