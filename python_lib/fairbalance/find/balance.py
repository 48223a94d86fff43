"""Entropy and balance of a label field, as in Suayama & Nakamura (natural log).

``H = -sum_c P_c ln P_c``; the normalized entropy ``H / ln |C|`` is 1 for a
perfectly balanced field. The optional cross-table of clusters x attribute
reproduces the paper's Table I (majority class and purity per cluster).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from fairbalance.core import claims, validation
from fairbalance.core.fields import label_path


def entropy(counts: Mapping[object, float] | Sequence[float]) -> float:
    """Shannon entropy (natural log) of a distribution given as counts or proportions."""
    values = np.asarray(list(counts.values()) if isinstance(counts, Mapping) else counts, dtype=float)
    if values.size == 0:
        return 0.0
    if np.any(values < 0) or not np.all(np.isfinite(values)):
        raise ValueError("counts must be finite and non-negative")
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(-(p * np.log(p)).sum())


def normalized_entropy(counts: Mapping[object, float] | Sequence[float]) -> float:
    """Entropy divided by ``ln |C|`` (1.0 = perfectly balanced); 0 for one class."""
    n = sum(1 for v in (counts.values() if isinstance(counts, Mapping) else counts) if v > 0)
    return entropy(counts) / math.log(n) if n > 1 else 0.0


@dataclass
class CrossTableRow:
    cluster: str
    count: int
    counts: dict[str, int]
    majority: str
    purity: float


@dataclass
class BalanceReport:
    """Counts, proportions and entropy of one label field over a view."""

    label_field: str
    num_samples: int
    num_missing: int
    counts: dict[str, int]
    proportions: dict[str, float]
    entropy: float
    normalized_entropy: float
    max_entropy: float
    imbalance_ratio: float
    attribute_field: str | None = None
    cross_table: list[CrossTableRow] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.counts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["num_classes"] = self.num_classes
        return d

    def format(self) -> str:
        """A plain-text table for terminals and logs."""
        lines = [
            f"{self.label_field}: {self.num_samples} samples, {self.num_classes} classes"
            + (f", {self.num_missing} without a label" if self.num_missing else ""),
            f"  entropy {self.entropy:.3f} (max ln|C| = {self.max_entropy:.3f}, "
            f"normalized {self.normalized_entropy:.3f}), imbalance ratio {self.imbalance_ratio:.2f}",
        ]
        width = max((len(k) for k in self.counts), default=5)
        for label, count in self.counts.items():
            lines.append(f"  {label:<{width}}  {count:>7d}  {100 * self.proportions[label]:6.2f}%")
        if self.cross_table:
            lines.append(f"  {self.label_field} x {self.attribute_field}:")
            for row in self.cross_table:
                lines.append(
                    f"  {row.cluster:<{width}}  n={row.count:<6d} majority={row.majority} "
                    f"purity={row.purity:.2f}"
                )
        return "\n".join(lines)


def _sorted_counts(raw: Mapping) -> dict[str, int]:
    def key(item):
        label = item[0]
        return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)

    return dict(sorted(((str(k), int(v)) for k, v in raw.items()), key=key))


@claims.exclusive
def balance_report(
    samples,
    label_field: str,
    attribute_field: str | None = None,
    run_key: str | None = None,
    overwrite: bool = False,
) -> BalanceReport:
    """Entropy, normalized entropy, counts and imbalance ratio of ``label_field``.

    Uses database aggregations (no Python loop over samples). With
    ``attribute_field`` (e.g. a ground-truth attribute), also returns the
    clusters x attribute cross-table with each cluster's majority and purity.
    With ``run_key``, the report is saved as a run (a snapshot to compare
    before/after balancing); nothing is written to the samples.
    """
    from fairbalance.core import runs

    run = None
    if run_key is not None:
        run = runs.prepare(
            samples, run_key, "balance_report",
            {"label_field": label_field, "attribute_field": attribute_field}, [], overwrite,
        )
    report = _compute_report(samples, label_field, attribute_field)
    if run is not None:
        run.write(lambda: None)
        run.save_results(report.to_dict())
    return report


def _joint_counts(samples, label_key: str, attribute_key: str | None = None,
                  generated_key: str | None = None) -> dict[tuple, int]:
    """``{(label, attribute, generated): count}`` of ``samples`` in one pass (one ``$group``).

    One aggregation instead of one per count: on 1M samples each pass is a
    full collection scan (seconds), and the panel needs four counts.
    """
    key = {"c": f"${label_key}"}
    if attribute_key is not None:
        key["a"] = f"${attribute_key}"
    if generated_key is not None:
        key["g"] = {"$eq": [f"${generated_key}", True]}
    out: dict[tuple, int] = {}
    for doc in samples._aggregate(pipeline=[{"$group": {"_id": key, "n": {"$sum": 1}}}]):
        k = doc["_id"]
        cell = (k.get("c"), k.get("a"), bool(k.get("g")))
        out[cell] = out.get(cell, 0) + int(doc["n"])
    return out


def assigned_joint_counts(samples, label_field: str, attribute_key: str | None = None,
                          generated_field: str = "generated") -> tuple[dict[tuple, int], str | None, bool]:
    """``{(label, attribute, generated): count}``, generated samples counted in the group their own features fall in.

    A generator labels its samples with the group it *planned* (the cluster
    it conditioned on); whether the image landed there is another matter.
    When ``label_field`` is a pseudo-label field (a ``compute_pseudo_labels``
    run wrote it) and generated samples have that run's features, each is
    counted in the group of the nearest cluster centre (the mean of the real
    samples' features per group); others by their planned group. Returns the
    counts, how generated samples were counted (None when there are none) and
    whether any was counted by its features. The gate and the panel share it.
    """
    from fiftyone import ViewField as Fv

    from fairbalance.core import runs

    root = samples._root_dataset
    path = label_path(samples, label_field)
    generated_key = generated_field if root.has_field(generated_field) else None
    joint = _joint_counts(samples, path, attribute_key, generated_key)
    if not any(g for (_, _, g) in joint):
        return joint, None, False
    made_by = [k for k in runs.list_runs(samples, "pseudo_labels")
               if runs.get_run_config(samples, k).get("label_field") == label_field]
    features = runs.get_run_config(samples, made_by[-1]).get("features_field") if made_by else None
    if features is None or not root.has_field(features):
        why = "no features to assign them by" if made_by else "not a pseudo-label field: no cluster centres"
        return joint, f"by their planned '{label_field}' ({why})", False
    real = samples.match(Fv(generated_field) != True)  # noqa: E712
    labels, x = real.exists(features).exists(path).values([path, features])
    groups = sorted(set(labels))
    if not groups:
        return joint, f"by their planned '{label_field}' (no real sample has features)", False
    x = np.stack([np.asarray(v, dtype=np.float64) for v in x])
    centres = np.stack([x[[i for i, lab in enumerate(labels) if lab == g]].mean(axis=0) for g in groups])
    joint = {cell: n for cell, n in joint.items() if not cell[2]}  # the real samples; generated ones counted below
    gen = samples.match(Fv(generated_field) == True)  # noqa: E712
    planned, vectors = gen.values([path, features])
    attributes = gen.values(attribute_key) if attribute_key is not None else [None] * len(planned)
    assigned = moved = kept = 0
    for label, v, a in zip(planned, vectors, attributes):
        if v is not None:
            d = ((centres - np.asarray(v, dtype=np.float64)) ** 2).sum(axis=1)
            new = groups[int(np.argmin(d))]
            assigned += 1
            moved += new != label
            label = new
        else:
            kept += 1
        joint[(label, a, True)] = joint.get((label, a, True), 0) + 1
    how = (f"{assigned} by the group their own '{features}' are nearest to (the centre of the real samples of each "
           f"'{label_field}'; {moved} differ from the planned one)")
    if kept:
        how += f", {kept} without features by their planned '{label_field}'"
    return joint, how, assigned > 0


def joint_report(joint: Mapping[tuple, int], label_field: str, attribute_field: str | None,
            generated: bool | None = None) -> BalanceReport:
    """The report of the cells of ``joint`` (all, or those whose generated flag is ``generated``)."""
    raw: dict = {}
    table: dict[str, dict[str, int]] = {}
    for (c, a, g), n in joint.items():
        if generated is not None and g != generated:
            continue
        raw[c] = raw.get(c, 0) + n
        if c is not None and a is not None:
            row = table.setdefault(str(c), {})
            row[str(a)] = row.get(str(a), 0) + n
    missing = int(raw.pop(None, 0))
    if not raw:
        raise ValueError(f"Field '{label_field}' has no values in this view; compute it first")
    counts = _sorted_counts(raw)
    total = sum(counts.values())
    ent = entropy(counts)
    max_ent = math.log(len(counts)) if len(counts) > 1 else 0.0
    report = BalanceReport(
        label_field=label_field,
        num_samples=total + missing,
        num_missing=missing,
        counts=counts,
        proportions={k: v / total for k, v in counts.items()},
        entropy=ent,
        normalized_entropy=ent / max_ent if max_ent > 0 else 0.0,
        max_entropy=max_ent,
        imbalance_ratio=max(counts.values()) / min(counts.values()),
        attribute_field=attribute_field,
    )
    if attribute_field is not None:
        report.cross_table = _cross_table(table)
    return report


def _compute_report(samples, label_field: str, attribute_field: str | None) -> BalanceReport:
    validation.require_nonempty(samples)
    attribute_key = label_path(samples, attribute_field) if attribute_field is not None else None
    joint = _joint_counts(samples, label_path(samples, label_field), attribute_key)
    return joint_report(joint, label_field, attribute_field)


def _cross_table(table: Mapping[str, Mapping[str, int]]) -> list[CrossTableRow]:
    rows = []
    for cluster in _sorted_counts({k: 0 for k in table}):
        counts = _sorted_counts(table[cluster])
        n = sum(counts.values())
        majority = max(counts, key=counts.get)
        rows.append(CrossTableRow(cluster, n, counts, majority, counts[majority] / n))
    return rows


# the name the panel's summaries are cached under; "/2": summaries stored before generated samples were counted by
# their features (:func:`assigned_joint_counts`) are not reused
SUMMARY_CACHE_NAME = "balance_summary/2"


def balance_summary(
    samples,
    label_field: str,
    attribute_field: str | None = None,
    generated_field: str = "generated",
    sa_run_key: str | None = None,
    cache: bool = False,
) -> dict:
    """Everything the Balance panel shows, from one database aggregation (no per-sample Python, except the
    generated samples' features when they are counted by them: those vectors are read and assigned in numpy).

    ``before`` covers the original samples (``generated`` not True), ``after``
    the whole view (original + generated) when generated samples exist, each
    generated sample counted as the gate counts it (:func:`assigned_joint_counts`;
    ``generated_counted_by`` says how, ``generated_assigned`` whether by features). With
    ``attribute_field``, a clusters x attribute heat map of row proportions.
    ``related_texts`` lists the texts chosen by the newest SA-features run.
    ``cache=True`` (the panel) reuses the summary stored for this view while
    the dataset is unchanged (:mod:`fairbalance.core.summary_cache`): 1M samples
    are a full pass each time otherwise.
    """
    if cache:
        from fairbalance.core import summary_cache

        arguments = {"label_field": label_field, "attribute_field": attribute_field,
                     "generated_field": generated_field, "sa_run_key": sa_run_key}
        return summary_cache.cached(samples, SUMMARY_CACHE_NAME, arguments,
                                    lambda: balance_summary(samples, **arguments))
    from fairbalance.core import runs

    validation.require_nonempty(samples)
    attribute_key = label_path(samples, attribute_field) if attribute_field is not None else None
    # one pass over the samples for all the counts below; generated samples counted by the group their features
    # fall in where a pseudo-label run gives cluster centres (as the gate counts them), else by the planned one
    joint, counted_by, assigned = assigned_joint_counts(samples, label_field, attribute_key, generated_field)
    has_generated = any(g for (_, _, g) in joint)
    before = joint_report(joint, label_field, attribute_field, generated=False if has_generated else None)
    after = joint_report(joint, label_field, None) if has_generated else None
    out = {
        "label_field": label_field,
        "attribute_field": attribute_field,
        "before": _brief(before),
        "after": _brief(after) if after else None,
        "classes": list((after or before).counts),
        "heatmap": None,
        "related_texts": [],
        "generated_counted_by": counted_by,
        "generated_assigned": assigned,
    }
    if attribute_field and before.cross_table:
        # real, and real + generated (where the repair shows): shares of each row and the counts behind them
        both = joint_report(joint, label_field, attribute_field) if has_generated else None
        tables = [before.cross_table] + ([both.cross_table] if both and both.cross_table else [])
        attrs = sorted({a for table in tables for row in table for a in row.counts}, key=str)

        def grid(table):
            return {"x": [str(a) for a in attrs], "y": [row.cluster for row in table],
                    "z": [[row.counts.get(a, 0) / row.count for a in attrs] for row in table],
                    "counts": [[row.counts.get(a, 0) for a in attrs] for row in table]}

        out["heatmap"] = {**grid(before.cross_table),
                          "purity": {row.cluster: row.purity for row in before.cross_table}}
        out["heatmap_after"] = grid(tables[1]) if len(tables) > 1 else None
    keys = [sa_run_key] if sa_run_key else runs.list_runs(samples, "sa_features")[-1:]
    for key in keys:
        out["related_texts"] = runs.load_run_results(samples, key).get("related_texts", [])
    return out


def _brief(report: BalanceReport) -> dict:
    return {
        "counts": report.counts,
        "num_samples": report.num_samples,
        "num_missing": report.num_missing,
        "entropy": report.entropy,
        "normalized_entropy": report.normalized_entropy,
        "max_entropy": report.max_entropy,
        "imbalance_ratio": report.imbalance_ratio,
    }
