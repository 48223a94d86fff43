"""Slice discovery: groups of samples a model gets wrong that nobody named, and words for them.

``discover_slices`` finds coherent, under-performing slices without any
bias label, from the model's own features:

- features: the penultimate layer of a classifier (by default the
  GCE-biased model of :func:`fairbalance.compute_hardness_tags`, trained
  here: no pretrained weights needed; or any trained classifier run), or any
  stored vector field (CLIP embeddings, ...), joined by default with the
  classifier's first hidden layer and model-free image statistics
  (:mod:`fairbalance.tag.slice_features`: what a biased model does not use);
- ``method="error_aware"`` (Domino-like, Eyuboglu et al. 2022): per class, the
  features (PCA, unit total variance) together with the model's error
  ``1 - p(y|x)`` scaled by ``error_weight`` are clustered, so that samples the
  model fails on *and* that look alike fall in one slice;
- ``method="george"`` (Sohoni et al. 2020): per class, the features alone.

Each sample gets a slice label (``"<class>/<j>"``, j = 0 the highest error
rate of its class) and its membership score; each slice is recorded with its
size, class, the model's error rate there, the gap to its class's error rate,
and names in words from what is at hand (:mod:`fairbalance.tag.slice_names`): categorical
metadata over-represented in the slice (lift and count, like sliceguard and
Spotlight) and caption keywords over-represented against the rest of its
class (B2T, Kim et al. 2024). The slice field is a plain string field, so it
plugs into the rest of the road as an attribute (``generate_balanced(
mode="cells", attribute_field="slice")``, ``finetune_per_group``, the gate,
``train_classifier(method="group_dro", group_field="slice")``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from fairbalance.core import folders, runs, sharding, validation, writeback
from fairbalance.tag import slice_features, slice_shards
from fairbalance.tag import slice_names as naming
from fairbalance.tag.hardness import BIASED_MODEL, model_settings  # the biased model (trained when none is given)

METHODS = ("error_aware", "george")
# the settings that train the biased model: with a trained classifier they are its own
TRAINING_SETTINGS = ("q", "backbone", "epochs", "lr", "image_size", "normalize")
MAX_PCA_DIMS = 32
DEFAULT_SOURCES = ("model", "early", "pixels")  # bench_discovery: p@10 0.63 with the model alone (README)
MAX_NAME_VALUES = 50  # a categorical field with more distinct values (ids, paths) names nothing


@dataclass
class SliceFit:
    """Slices of n samples: ``assign`` (n,) slice index, ``slice_class`` (S,) class index, ``scores`` (n x S)
    membership (0 outside the slice's class): how strongly each sample belongs to each slice."""

    assign: np.ndarray
    slice_class: np.ndarray
    scores: np.ndarray


def _reduce(x: np.ndarray, max_dims: int = MAX_PCA_DIMS) -> np.ndarray:
    """Centred PCA of ``x`` to at most ``max_dims`` dimensions, scaled to unit total variance."""
    x = x - x.mean(0)
    r = int(min(max_dims, x.shape[1], max(1, len(x) - 1)))
    if x.shape[1] > r:
        u, s, _ = np.linalg.svd(x, full_matrices=False)
        x = u[:, :r] * s[:r]
    total = float((x ** 2).sum(1).mean())
    return x / np.sqrt(total) if total > 0 else x


def _cluster(z: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means labels and soft memberships (Gaussian responsibilities, one shared variance)."""
    from sklearn.cluster import KMeans

    k = int(min(k, len(z)))
    if k < 2:
        return np.zeros(len(z), dtype=int), np.ones((len(z), 1))
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(z)
    d2 = ((z[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)
    sigma2 = max(float(d2[np.arange(len(z)), km.labels_].mean()), 1e-12)
    logits = -d2 / (2 * sigma2)
    resp = np.exp(logits - logits.max(1, keepdims=True))
    return km.labels_, resp / resp.sum(1, keepdims=True)


def find_slices(features, labels: np.ndarray, errors: np.ndarray | None, method: str = "error_aware",
                slices_per_class: int = 5, error_weight: float = 2.0, seed: int = 0) -> SliceFit:
    """Slices of every class (the computation of :func:`discover_slices`, on arrays).

    ``features``: one matrix, or a list of them (feature sources): each is
    reduced per class to unit total variance and they are joined with equal
    weight. ``errors``: the model's per-sample error ``1 - p(y|x)`` in [0, 1]
    (needed by ``error_aware``, and to order the slices of a class, highest
    error first). Slices with no sample are dropped.
    """
    sources = [np.asarray(f, dtype=np.float64) for f in (features if isinstance(features, (list, tuple)) else
                                                          [features])]
    n = len(labels)
    assign = np.empty(n, dtype=int)
    parts, slice_class = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        z = np.concatenate([_reduce(f[idx]) for f in sources], axis=1) / np.sqrt(len(sources))
        if method == "error_aware":
            z = np.concatenate([z, error_weight * errors[idx, None]], axis=1)
        local, resp = _cluster(z, slices_per_class, seed)
        used = np.unique(local)
        order = sorted(used, key=lambda j: -float(errors[idx][local == j].mean()) if errors is not None else 0)
        for new, j in enumerate(order):
            assign[idx[local == j]] = len(slice_class) + new
        parts.append((idx, resp[:, order]))
        slice_class.extend([int(c)] * len(order))
    scores = np.zeros((n, len(slice_class)), dtype=np.float32)
    start = 0
    for idx, resp in parts:
        scores[np.ix_(idx, np.arange(start, start + resp.shape[1]))] = resp
        start += resp.shape[1]
    return SliceFit(assign, np.array(slice_class, dtype=int), scores)


def _clip_bank(samples, features_field: str | None, features, device=None) -> tuple[tuple | None, str]:
    """``((embeddings, WordNet text embeddings, texts), how)`` when ``features_field`` holds CLIP embeddings
    whose model loads here; else ``(None, why not)``."""
    from fairbalance.core import models
    from fairbalance.find import embeddings, related_texts

    spec = embeddings.stored_model(samples, features_field) if features_field else None
    if not spec:
        return None, "skipped: no CLIP embeddings (features_field) to name slices with"
    try:
        clip = models.load_clip(spec.get("model"), spec.get("pretrained"), device=device)
    except Exception as e:  # weights not on disk (offline): named from the rest, and the record says why
        return None, f"skipped: {spec.get('model')}/{spec.get('pretrained')} not available ({type(e).__name__})"
    texts, _ = related_texts.wordnet_candidates()
    return (features, related_texts.gloss_embeddings(clip), texts), f"WordNet glosses, {spec.get('model')}"


# --- the writer ------------------------------------------------------------------------------------------------


@dataclass
class DiscoveryResult:
    run_key: str
    slice_field: str
    score_field: str
    method: str
    features: str
    num_slices: int
    num_samples: int
    num_skipped: int
    class_error_rate: dict[str, float]
    slices: list[dict] = field(default_factory=list)  # ranked by error gap, largest first
    checkpoint: str | None = None
    clip_naming: str | None = None  # how the CLIP text bank named the slices, or why it did not
    feature_sources: list[str] = field(default_factory=lambda: ["model"])
    name_fields: list[str] = field(default_factory=list)  # the categorical fields read for names

    def to_dict(self) -> dict:
        return asdict(self)


def output_fields(slice_field: str) -> list[str]:
    """The fields a discovery run writes: the slice label and its membership score (``_score``)."""
    return [slice_field, f"{slice_field}_score"]


def shard_fields(kwargs: dict) -> list[str]:
    """The fields a sharded run with these ``discover_slices`` arguments writes (asked by the capability table):
    the slice, its score, and the per-sample outputs the shards computed and the merge clusters."""
    import inspect

    name = kwargs.get("slice_field") or inspect.signature(discover_slices).parameters["slice_field"].default
    return output_fields(name) + [slice_shards.features_field(name)]


def _stored_features(samples, ids: list[str], features_field: str) -> np.ndarray:
    """The ``features_field`` vectors of ``ids``, in that order; an error when one is missing."""
    from fairbalance.find import embeddings

    fids, matrix, missing = embeddings.load(samples.select(ids), features_field)
    if missing:
        raise validation.FairBalanceError(
            f"{len(missing)} labelled sample(s) have no '{features_field}': compute it for the whole view first")
    row = {i: j for j, i in enumerate(fids)}
    return validation.require_finite_matrix(features_field, matrix[[row[i] for i in ids]])


def _records(fit: SliceFit, classes, wrong, errors, names, class_error) -> tuple[list[str], list[dict]]:
    """Each slice's id (``"<class>/<j>"``, in ``fit``'s order) and its records, ranked by error gap."""
    slice_names, records = [], []
    for s, c in enumerate(fit.slice_class):
        j = s - int(np.flatnonzero(fit.slice_class == c)[0])
        sid = f"{classes[c]}/{j}"
        slice_names.append(sid)
        members = fit.assign == s
        rate = float(wrong[members].mean())
        records.append({"slice": sid, "class": classes[c], "size": int(members.sum()),
                        "errors": int(wrong[members].sum()), "error_rate": rate,
                        "class_error_rate": class_error[classes[c]], "error_gap": rate - class_error[classes[c]],
                        "mean_error": float(errors[members].mean()),
                        "name": names[s][0]["text"] if names[s] else None, "names": names[s]})
    records.sort(key=lambda r: (-r["error_gap"], -r["size"], r["slice"]))
    return slice_names, records


def _errors(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(1 - p(y|x), misclassified)`` per sample."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return 1.0 - probs[np.arange(len(labels)), labels], probs.argmax(1) != labels


def _names(samples, ids, fit, labels, cfg: dict, features, device) -> tuple[list, str, list[str]]:
    """Every slice's names (metadata, captions, CLIP text bank), how the CLIP bank was used, the fields read."""
    fields = naming.naming_fields(samples, cfg["label_field"], shard_fields(cfg), cfg.get("name_fields"),
                                  cfg.get("exclude_name_fields"))
    columns = naming.name_columns(samples, ids, fields, MAX_NAME_VALUES)
    captions = None
    if cfg["captions_field"]:
        by_id = dict(zip(*samples.select(ids).values(["id", cfg["captions_field"]])))
        captions = [by_id.get(i) for i in ids]
    bank, clip_naming = (_clip_bank(samples, cfg["features_field"], features, device) if cfg["name_with_clip"]
                         else (None, "off"))
    return naming.name_slices(columns, captions, fit, labels, bank), clip_naming, fields


def slices_from_outputs(samples, data, outputs: tuple, features, cfg: dict, device=None, num_skipped: int = 0,
                        run_key: str = "slices") -> tuple["DiscoveryResult", dict]:
    """Cluster, name and rank the slices of ``data`` (real labelled samples) from the model's ``outputs``
    (``(penultimate, logits, {source: matrix})``; ``features``, when given, stand for ``"model"``), with the
    settings of the run config ``cfg``: the result and the values to write (``{field: {id: value}}``).
    The one computation of an unsharded run and of a sharded run's merge."""
    penultimate, logits, extra = outputs
    labels, classes, ids = data.labels, data.classes, data.ids
    errors, wrong = _errors(logits, labels)
    model = features if features is not None else penultimate
    sources = [model if s == "model" else slice_features.standardise(extra[s]) if s == "pixels" else extra[s]
               for s in cfg["feature_sources"]]
    fit = find_slices(sources, labels, errors, cfg["algorithm"], cfg["slices_per_class"], cfg["error_weight"],
                      cfg["seed"])
    names, clip_naming, name_fields = _names(samples, ids, fit, labels, cfg, features, device)
    class_error = {classes[c]: float(wrong[labels == c].mean()) for c in np.unique(labels)}
    slice_names, records = _records(fit, classes, wrong, errors, names, class_error)
    score = fit.scores[np.arange(len(ids)), fit.assign]
    values = {cfg["slice_field"]: {i: slice_names[s] for i, s in zip(ids, fit.assign)},
              cfg["score_field"]: {i: float(v) for i, v in zip(ids, score)}}
    result = DiscoveryResult(run_key, cfg["slice_field"], cfg["score_field"], cfg["algorithm"], cfg["features"],
                             len(records), len(ids), num_skipped, class_error, records, cfg["checkpoint"],
                             clip_naming, list(cfg["feature_sources"]), name_fields)
    return result, values


def _given_classifier(samples, classifier, classifier_run, settings: dict):
    """The trained classifier and its folder; training settings other than the defaults are refused."""
    from fairbalance.tag import hardness

    defaults = {**{n: getattr(BIASED_MODEL, n) for n in TRAINING_SETTINGS}, "output_dir": None}
    extra = [n for n, v in settings.items() if n in defaults and v != defaults[n]]
    if extra:
        raise validation.FairBalanceError(f"With a trained classifier nothing is trained here: drop {', '.join(extra)}")
    return hardness._load_given(samples, classifier, classifier_run)


def _model_config(clf, biased, checkpoint, classifier, classifier_run) -> dict:
    """The model that ranked the samples, with its settings: the caller's when trained here, else its own."""
    names = TRAINING_SETTINGS + ("batch_size",)
    given = {"checkpoint": checkpoint, "classifier": classifier and os.path.abspath(os.fspath(classifier)),
             "classifier_run": classifier_run}
    if clf is None:
        return {**given, **model_settings(biased, names), "trained_here": True}
    return {**given, **model_settings(clf.config, names), "training_method": clf.config.method, "trained_here": False}


def _model_and_samples(samples, label_field, classifier, classifier_run, biased, output_dir, run_key):
    """``(the given classifier or None, its folder or the one to train into, the real labelled samples)``."""
    from fairbalance.tag import hardness

    clf = None
    if classifier is not None or classifier_run is not None:
        training_settings = {**model_settings(biased, TRAINING_SETTINGS), "output_dir": output_dir}
        clf, output_dir = _given_classifier(samples, classifier, classifier_run, training_settings)
    data = hardness.real_labelled(samples, label_field, clf)
    if len(set(data.labels.tolist())) < 2:
        raise validation.FairBalanceError(f"'{label_field}' has only one class in this view")
    if clf is None:
        dataset = samples._root_dataset
        output_dir = os.path.abspath(output_dir or folders.default_folder("checkpoints", dataset.name, run_key))
    return clf, output_dir, data


def merge_shards(samples, job: dict) -> dict:
    """Cluster, name and write the slices of a sharded run from the outputs its shards stored
    (:mod:`~fairbalance.tag.slice_shards`): the results of the unsharded run with the same classifier."""
    from fairbalance.tag import hardness
    from fairbalance.train import training

    cfg = job["config"]
    data = hardness.real_labelled(samples, cfg["label_field"], training.load_classifier(cfg["checkpoint"]))
    outputs = slice_shards.stored_outputs(samples, data.ids, slice_shards.features_field(cfg["slice_field"]),
                                          job.get("shared", {}).get("layout") or {})
    features = _stored_features(samples, data.ids, cfg["features_field"]) if cfg["features_field"] else None
    result, values = slices_from_outputs(samples, data, outputs, features, cfg, None, data.num_unlabelled,
                                         job["run_key"])
    writeback.set_values_by_id(samples._root_dataset, values, ids=data.ids)
    return result.to_dict()


def validate_inputs(samples, label_field="ground_truth", method="error_aware", features_field=None,
                    slice_field="slice", slices_per_class=5, error_weight=2.0, captions_field=None,
                    classifier=None, classifier_run=None, seed=0, feature_sources=DEFAULT_SOURCES,
                    name_fields=None, exclude_name_fields=None, sharded: bool = True, load_classifier: bool = True,
                    **settings) -> None:
    """The up-front checks of :func:`discover_slices` (also run by ``queue_sharded`` before queuing, so
    ``sharded`` defaults to True there: a sharded run needs the classifier trained once, before the shards;
    ``load_classifier``: it is loaded here, and refused with the errors of a call, before anything is queued)."""
    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    if method not in METHODS:
        raise validation.FairBalanceError(f"method must be one of {METHODS}, not {method!r}")
    for name in output_fields(slice_field) + [slice_shards.features_field(slice_field)] * sharded:
        validation.require_field_name(name)
    if slice_field == label_field:
        raise validation.FairBalanceError(f"slice_field '{slice_field}' is the label field: choose another name")
    validation.require_positive_int("slices_per_class", slices_per_class, minimum=1)
    if isinstance(error_weight, bool) or not isinstance(error_weight, (int, float)) or not (
            np.isfinite(error_weight) and error_weight >= 0):
        raise validation.FairBalanceError(f"error_weight must be a finite number >= 0, got {error_weight!r}")
    validation.require_seed(seed)
    if isinstance(feature_sources, str) or not feature_sources or not set(feature_sources) <= set(
            slice_features.SOURCES) or len(set(feature_sources)) != len(feature_sources):
        raise validation.FairBalanceError(
            f"feature_sources must be distinct values of {slice_features.SOURCES}, got {feature_sources!r}")
    if features_field and "model" not in feature_sources:
        raise validation.FairBalanceError(
            f"features_field '{features_field}' stands for the 'model' feature source, which feature_sources "
            f"{list(feature_sources)!r} leaves out: add 'model' to feature_sources, or drop features_field")
    validation.require_fields(samples, [label_field] + [f for f in (features_field, captions_field) if f])
    naming.naming_fields(samples, label_field, shard_fields({"slice_field": slice_field}), name_fields,
                         exclude_name_fields)
    if classifier is not None and classifier_run is not None:
        raise validation.FairBalanceError("pass classifier or classifier_run, not both")
    if sharded and classifier is None and classifier_run is None:
        raise validation.FairBalanceError(
            "Sharded discovery needs the biased classifier trained once, before the shards (each shard only runs "
            "it on its images): train it with fairbalance.train_classifier(view, label_field, method='biased', "
            "run_key='biased') and pass classifier=<its checkpoint folder> or classifier_run='biased'")
    if sharded and load_classifier:
        _given_classifier(samples, classifier, classifier_run, settings)


@runs.writer("discover_slices")
def discover_slices(
    samples,
    label_field: str = "ground_truth",
    method: str = "error_aware",
    features_field: str | None = None,
    slice_field: str = "slice",
    slices_per_class: int = 5,
    error_weight: float = 2.0,
    captions_field: str | None = None,
    classifier: str | None = None,
    classifier_run: str | None = None,
    q: float = BIASED_MODEL.q,
    backbone: str = BIASED_MODEL.backbone,
    image_size: int | None = BIASED_MODEL.image_size,
    normalize: str = BIASED_MODEL.normalize,
    epochs: int = BIASED_MODEL.epochs,
    batch_size: int = BIASED_MODEL.batch_size,
    lr: float = BIASED_MODEL.lr,
    seed: int = 0,
    device: str | None = None,
    num_workers: int = BIASED_MODEL.num_workers,
    name_with_clip: bool = True,
    run_key: str = "slices",
    output_dir: str | None = None,
    overwrite: bool = False,
    progress=None,
    feature_sources: tuple[str, ...] | list[str] = DEFAULT_SOURCES,
    name_fields: list[str] | None = None,
    exclude_name_fields: list[str] | None = None,
    shard: int | None = None,
    num_shards: int | None = None,
    chunk_size: int = sharding.DEFAULT_CHUNK_SIZE,
) -> DiscoveryResult | sharding.ShardResult:
    """Find under-performing slices of every class with no bias label; store and name them.

    The model: ``classifier`` (a checkpoint folder) or ``classifier_run`` (a
    ``train_classifier`` run), else a GCE-biased classifier trained here
    (``q``, ``backbone``, ``epochs``, ... as in ``compute_hardness_tags``;
    saved under ``output_dir``). ``feature_sources`` (:mod:`~fairbalance.tag.slice_features`), joined with
    equal weight: ``"model"`` (its penultimate layer, or ``features_field``: any vector field, e.g. CLIP
    embeddings), ``"early"`` (its first hidden layer), ``"pixels"`` (image statistics). ``method``:
    ``"error_aware"`` (features + the model's error, per class) or ``"george"`` (features alone, per class);
    ``slices_per_class`` clusters each. Writes ``slice_field`` (``"<class>/<j>"``, j = 0 the worst of its
    class) and ``<slice_field>_score`` on the real labelled samples, and
    records the run with every slice: size, class, error rate, gap to its
    class, names (categorical metadata over-represented in the slice; caption
    keywords from ``captions_field``; the WordNet text bank when ``features_field``
    holds CLIP embeddings whose weights are on disk). ``overwrite=True`` replaces them.

    ``name_fields``: the categorical fields that may name slices (None: every categorical field but the label,
    other discovery runs' slices and ``exclude_name_fields``, e.g. ground-truth or evaluation fields such as
    ``bias_aligned``); an unknown or non-categorical field is refused before any work.
    ``shard, num_shards`` (needs ``classifier`` or ``classifier_run``: trained once, before the shards;
    :func:`fairbalance.queue_sharded` queues them): the model's outputs of the shard's samples, stored in
    ``<slice_field>_features`` per chunk of ``chunk_size``; the last shard to finish clusters, names and records
    the run, as one unsharded call with the same classifier; returns a :class:`~fairbalance.core.sharding.ShardResult`.
    """
    from fairbalance.train import training

    sharded = shard is not None or num_shards is not None
    validate_inputs(samples, label_field, method, features_field, slice_field, slices_per_class, error_weight,
                    captions_field, classifier, classifier_run, seed, feature_sources, name_fields,
                    exclude_name_fields, sharded=sharded, load_classifier=False)  # loaded once, below
    sharding.one_shard_requested(shard, num_shards, overwrite)
    feature_sources = list(feature_sources)
    biased = replace(BIASED_MODEL, label_field=label_field, q=q, backbone=backbone, image_size=image_size,
                     normalize=normalize, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                     num_workers=num_workers)
    clf, output_dir, data = _model_and_samples(samples, label_field, classifier, classifier_run, biased, output_dir,
                                               run_key)
    ids, paths, classes = data.ids, data.filepaths, data.classes
    dataset = samples._root_dataset
    fields = output_fields(slice_field)
    config = {"label_field": label_field, "algorithm": method, "features_field": features_field,
              "features": features_field or "penultimate layer of the classifier", "slice_field": slice_field,
              "score_field": fields[1], "slices_per_class": slices_per_class, "error_weight": error_weight,
              "captions_field": captions_field, "name_with_clip": name_with_clip, "seed": seed,
              **_model_config(clf, biased, output_dir, classifier, classifier_run),
              "feature_sources": feature_sources, "name_fields": name_fields, "exclude_name_fields": exclude_name_fields}
    if sharded:
        return slice_shards.compute_shard(samples, clf, config, shard_fields(config), ids, run_key, shard,
                                          num_shards, chunk_size, batch_size, device, num_workers, progress)
    features = _stored_features(samples, ids, features_field) if features_field else None
    run = runs.prepare(samples, run_key, "discover_slices", config, fields, overwrite)
    if trained := clf is None:
        folders.claim_output_folder(output_dir, dataset, run_key)
        clf = training.train_classifier(samples.select(ids), replace(biased, classes=classes), device=device,
                                        progress=progress)
    outputs = slice_features.model_outputs(clf, paths, device, batch_size, num_workers, feature_sources)
    result, values = slices_from_outputs(samples, data, outputs, features, config, device, data.num_unlabelled,
                                         run_key)

    def write():
        if trained:
            folders.replace_contents(output_dir, clf.save)
        writeback.set_values_by_id(dataset, values, ids=ids)

    run.write(write)
    run.save_results(result.to_dict())
    return result
