"""Pseudo-labels: clusters of the SA features (Suayama & Nakamura, III-C), stored as labels."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fairbalance.core import claims, runs, validation, writeback
from fairbalance.find import balance, clustering


@dataclass
class PseudoLabelsResult:
    run_key: str
    label_field: str
    method: str
    backend: str
    criterion: str
    num_clusters: int
    counts: dict[str, int]
    entropy: float
    normalized_entropy: float
    num_skipped: int

    def to_dict(self) -> dict:
        return asdict(self)


def _load_features(samples, features_field: str) -> tuple[list[str], np.ndarray, int]:
    import fiftyone as fo

    validation.require_fields(samples, [features_field])
    f = samples.get_field(features_field)
    if not isinstance(f, (fo.VectorField, fo.ListField)):
        raise validation.FairBalanceError(
            f"Field '{features_field}' has type {type(f).__name__}; expected a vector field of features"
        )
    ids, vectors = samples.values(["id", features_field])
    have = [(i, v) for i, v in zip(ids, vectors) if v is not None]
    if not have:
        raise validation.FairBalanceError(f"No sample in the view has '{features_field}'; compute SA features first")
    try:
        x = np.stack([np.asarray(v, dtype=np.float64) for _, v in have])
    except ValueError as e:
        raise validation.FairBalanceError(f"'{features_field}' vectors differ in length: {e}") from e
    x = validation.require_finite_matrix(features_field, x)
    return [i for i, _ in have], x, len(ids) - len(have)


def validate_inputs(samples, features_field="sa_features", label_field="sa_cluster", method="xmeans", kmax=20,
                    num_clusters=None, criterion="pyclustering", backend="auto", seed=0) -> None:
    """The up-front checks of :func:`compute_pseudo_labels` (also run by ``audit_balance`` before its first step)."""
    validation.require_nonempty(samples)
    validation.require_field_name(features_field)
    validation.require_field_name(label_field)
    if method not in ("xmeans", "kmeans"):
        raise validation.FairBalanceError("method must be 'xmeans' or 'kmeans'")
    if method == "xmeans":
        validation.require_positive_int("kmax", kmax, minimum=2)
    else:
        validation.require_positive_int("num_clusters", num_clusters, minimum=2)
    if criterion not in clustering.CRITERIA:
        raise validation.FairBalanceError(f"criterion must be one of {clustering.CRITERIA}")
    if backend not in clustering.BACKENDS:
        raise validation.FairBalanceError(f"backend must be one of {clustering.BACKENDS}")
    validation.require_seed(seed)


@claims.exclusive
def compute_pseudo_labels(
    samples,
    features_field: str = "sa_features",
    label_field: str = "sa_cluster",
    method: str = "xmeans",
    kmax: int = 20,
    num_clusters: int | None = None,
    criterion: str = "pyclustering",
    backend: str = "auto",
    seed: int = 0,
    run_key: str = "pseudo_labels",
    overwrite: bool = False,
) -> PseudoLabelsResult:
    """Cluster the SA features and store cluster ids as an ``fo.Classification`` field.

    ``method="xmeans"`` chooses the number of clusters (at most ``kmax``, the
    paper uses 20) by a BIC splitting rule (``criterion``: ``"pyclustering"``
    as in its reference implementation, or ``"bic"`` as in the X-means
    paper); ``method="kmeans"`` uses a fixed ``num_clusters``. Samples without
    features are skipped and counted.
    """
    validate_inputs(samples, features_field, label_field, method, kmax, num_clusters, criterion, backend, seed)
    ids, x, skipped = _load_features(samples, features_field)
    k_needed = kmax if method == "xmeans" else num_clusters
    if method == "kmeans" and len(ids) < k_needed:
        raise validation.FairBalanceError(f"{len(ids)} samples are fewer than {k_needed} clusters")
    if len(ids) < 2:
        raise validation.FairBalanceError("At least 2 samples with features are needed to cluster")
    config = {
        "features_field": features_field, "label_field": label_field, "algorithm": method, "kmax": kmax,
        "num_clusters": num_clusters, "criterion": criterion if method == "xmeans" else None,
        "backend": backend, "seed": seed,
    }
    run = runs.prepare(samples, run_key, "pseudo_labels", config, [label_field], overwrite)

    if method == "xmeans":
        result = clustering.xmeans(x, kmax=min(kmax, len(ids)), criterion=criterion, backend=backend, seed=seed)
    else:
        result = clustering.kmeans(x, num_clusters, seed=seed)
    labels = _relabel_by_size(result.labels)

    import fiftyone as fo

    values = {i: fo.Classification(label=str(int(c))) for i, c in zip(ids, labels)}
    # keyed by id, no select(ids): a $in of 1M ids is over MongoDB's 16 MB command limit
    run.write(lambda: writeback.set_values_by_id(samples, {label_field: values}, ids=ids))
    counts = {str(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))}
    out = PseudoLabelsResult(
        run_key=run_key, label_field=label_field, method=method, backend=result.backend,
        criterion=result.criterion, num_clusters=len(counts), counts=counts,
        entropy=balance.entropy(counts), normalized_entropy=balance.normalized_entropy(counts),
        num_skipped=skipped,
    )
    run.save_results({**out.to_dict(), "centers": result.centers.tolist(), "history": result.history})
    return out


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Cluster ids 0..M-1 ordered by decreasing size (ties by first appearance), for stable output."""
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda j: (-counts[j], first[j]))
    mapping = {uniq[j]: new for new, j in enumerate(order)}
    return np.array([mapping[v] for v in labels], dtype=int)
