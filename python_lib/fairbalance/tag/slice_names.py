"""Names for discovered slices, in words a person can act on, from whatever is at hand.

Categorical metadata over-represented in a slice (lift and count, like
sliceguard and Spotlight, kept only when a Fisher exact test says it is not
chance), caption keywords over-represented against the rest of its class
(B2T, Kim et al. 2024), and the CLIP text bank (Domino's naming).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np


def naming_fields(samples, label_field: str, own_fields, name_fields=None, exclude_name_fields=None) -> list[str]:
    """The categorical fields that may name slices: ``name_fields`` as given, or (None) every categorical field
    of the view but the label field, the run's ``own_fields``, the slices of other discovery runs
    (:func:`slicing_fields`) and ``exclude_name_fields`` (the fields the caller says are ground truth or
    evaluation, e.g. ``bias_aligned``). Checked before any work: a name that is
    not a field of the view, or not categorical (a Classification, str, int or bool field), is an error."""
    from fairbalance.core.fields import categorical_fields
    from fairbalance.core.validation import FairBalanceError

    for arg, given in (("name_fields", name_fields), ("exclude_name_fields", exclude_name_fields)):
        if given is not None and (isinstance(given, str) or not isinstance(given, (list, tuple)) or not all(
                isinstance(f, str) and f for f in given)):
            raise FairBalanceError(f"{arg} must be a list of field names (or None), not {given!r}")
    if name_fields is not None and exclude_name_fields is not None:
        raise FairBalanceError("pass name_fields (the fields that may name) or exclude_name_fields (the fields that "
                               "may not), not both")
    schema = samples.get_field_schema()
    categorical = categorical_fields(samples)
    for arg, given in (("name_fields", name_fields), ("exclude_name_fields", exclude_name_fields)):
        unknown = [f for f in given or () if f not in schema]
        if unknown:
            raise FairBalanceError(f"{arg}: no field {', '.join(map(repr, unknown))} in the view; its categorical "
                                   f"fields are {categorical}")
    if name_fields is None:
        skip = {label_field, *own_fields, *slicing_fields(samples), *(exclude_name_fields or ())}
        return [f for f in categorical if f not in skip]
    wrong = [f for f in name_fields if f not in categorical]
    if wrong:
        raise FairBalanceError(f"name_fields: {', '.join(map(repr, wrong))} not categorical (a Classification, str, "
                               f"int or bool field): only such fields can name a slice; categorical: {categorical}")
    taken = [f for f in name_fields if f == label_field or f in own_fields]
    if taken:
        raise FairBalanceError(f"name_fields: {', '.join(map(repr, taken))} is the label field or written by this "
                               "run: it cannot name the slices")
    return list(dict.fromkeys(name_fields))


def slicing_fields(samples) -> set[str]:
    """The fields written by discovery runs of the dataset (done, or sharded and still running): another slicing
    is no name in words (slice ``2/1`` of one run would name slice ``2/1`` of the next)."""
    from fairbalance.core import runs

    dataset = samples._root_dataset
    out = set()
    for key in dataset.list_runs():
        cfg = runs.get_run_config(dataset, key)
        if cfg.get("method") == runs.CONFIG_PREFIX + "discover_slices" or cfg.get("function") == "discover_slices":
            out.update(cfg.get("fields_written") or [])
    return out


def name_columns(samples, ids: list[str], fields: list[str], max_values: int) -> dict[str, list]:
    """The values of ``fields`` (categorical) for ``ids``, in that order; a field with one value or more than
    ``max_values`` distinct ones (ids, paths) is left out: it names nothing."""
    from fairbalance.core.fields import label_path

    if not fields:
        return {}
    cols = samples.select(ids, ordered=True).values([label_path(samples, f) for f in fields])
    return {n: list(col) for n, col in zip(fields, cols) if 1 < len({str(v) for v in col}) <= max_values}


def metadata_names(slice_members: np.ndarray, class_members: np.ndarray, columns: dict[str, list],
                   top: int = 3, min_share: float = 0.3, min_lift: float = 1.5, alpha: float = 0.05,
                   num_slices: int = 1) -> list[dict]:
    """Categorical values over-represented in a slice against its class (sliceguard/Spotlight's lift), kept only
    when that is not chance.

    ``columns``: field -> one value per sample. A value is a candidate when
    at least ``min_share`` of the slice has it, its lift (share in the slice
    / share in the class) is at least ``min_lift``, and a one-sided Fisher
    exact test (the hypergeometric tail: so many of the class's samples with
    the value falling in a slice of this size) has a p-value under ``alpha``
    after Bonferroni over every field x value of the class x ``num_slices``
    (a value that is merely common in one of many slices by chance is no
    name). Candidates rank by the share difference (slice minus rest), which
    weighs both lift and count.
    """
    from scipy.stats import hypergeom

    rest = class_members & ~slice_members
    size, n_rest = int(slice_members.sum()), int(rest.sum())
    found, tests = [], 0
    for name, values in columns.items():
        vals = np.asarray([str(v) if v is not None else None for v in values], dtype=object)
        in_slice = Counter(vals[slice_members])
        in_rest = Counter(vals[rest])
        tests += len([v for v in set(in_slice) | set(in_rest) if v is not None])
        for value, count in in_slice.items():
            if value is None:
                continue
            share = count / size
            share_rest = in_rest.get(value, 0) / n_rest if n_rest else 0.0
            share_class = (count + in_rest.get(value, 0)) / max(1, size + n_rest)
            lift = share / share_class if share_class else 0.0
            if share >= min_share and share > share_rest and lift >= min_lift:
                p = float(hypergeom.sf(count - 1, size + n_rest, count + in_rest.get(value, 0), size))
                found.append({"source": "metadata", "field": name, "value": value, "count": int(count),
                              "share": round(share, 4), "share_rest_of_class": round(share_rest, 4),
                              "lift": round(lift, 4), "p_value": p,
                              "score": round(share - share_rest, 4), "text": f"{name} = {value}"})
    family = max(1, tests * num_slices)
    out = [dict(d, p_value=float(f"{min(1.0, d['p_value'] * family):.3g}")) for d in found
           if d["p_value"] * family < alpha]
    return sorted(out, key=lambda d: (-d["score"], -d["count"], d["text"]))[:top]


def _stopwords() -> frozenset[str]:
    """English stopwords: NLTK's when its corpus is installed, else scikit-learn's (the caption filter's rule)."""
    try:
        import nltk

        nltk.data.find("corpora/stopwords")
        from nltk.corpus import stopwords

        return frozenset(stopwords.words("english"))
    except (ImportError, LookupError):
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        return frozenset(ENGLISH_STOP_WORDS)


def caption_names(slice_members: np.ndarray, class_members: np.ndarray, captions: list, top: int = 5,
                  min_share: float = 0.2) -> list[dict]:
    """Caption words over-represented in a slice against the rest of its class (B2T's keyword step).

    A word counts once per sample (in any of its captions); English stopwords
    are dropped (NLTK's list when its corpus is installed, else scikit-learn's, as ``filter_captions``).
    """
    stop = _stopwords()
    words = []
    for caps in captions:
        caps = [caps] if isinstance(caps, str) else list(caps or [])
        words.append({w for cap in caps for w in re.findall(r"[a-z0-9]+(?:'[a-z]+)?", str(cap).lower()) if w not in stop and len(w) > 1})
    rest = class_members & ~slice_members
    size, n_rest = int(slice_members.sum()), int(rest.sum())
    in_slice = Counter(w for j in np.flatnonzero(slice_members) for w in words[j])
    in_rest = Counter(w for j in np.flatnonzero(rest) for w in words[j])
    out = []
    for word, count in in_slice.items():
        share = count / size
        share_rest = in_rest.get(word, 0) / n_rest if n_rest else 0.0
        if share >= min_share and share > share_rest:
            out.append({"source": "captions", "word": word, "count": int(count), "share": round(share, 4),
                        "share_rest_of_class": round(share_rest, 4), "score": round(share - share_rest, 4),
                        "text": word})
    return sorted(out, key=lambda d: (-d["score"], -d["count"], d["text"]))[:top]


def clip_names(slice_members: np.ndarray, class_members: np.ndarray, embeddings: np.ndarray, bank: np.ndarray,
               texts: list[str], top: int = 3) -> list[dict]:
    """WordNet texts closest in CLIP space to what sets a slice apart from the rest of its class.

    The direction is the mean normalised image embedding of the slice minus
    that of the rest of its class (Domino's text-bank naming); ``bank``: the
    normalised text embeddings of ``texts`` (the SA step's WordNet glosses).
    """
    rest = class_members & ~slice_members
    if not rest.any():
        return []
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(1e-12)
    direction = e[slice_members].mean(0) - e[rest].mean(0)
    direction /= max(float(np.linalg.norm(direction)), 1e-12)
    sims = np.asarray(bank, dtype=np.float32) @ direction.astype(np.float32)
    best = np.argsort(-sims)[:top]
    return [{"source": "clip", "text": texts[j].split(", which means ")[0], "description": texts[j],
             "score": round(float(sims[j]), 4)} for j in best]


def name_slices(samples_columns: dict[str, list], captions: list | None, fit, labels: np.ndarray,
                clip_bank: tuple | None = None) -> list[list[dict]]:
    """The names of every slice of ``fit``: metadata first, then caption keywords (when captions exist), then
    the CLIP text bank (``clip_bank``: ``(image embeddings, text embeddings, texts)``, when CLIP is at hand)."""
    names = []
    for s, c in enumerate(fit.slice_class):
        members, cls = fit.assign == s, labels == c
        found = metadata_names(members, cls, samples_columns, num_slices=len(fit.slice_class)) if samples_columns \
            else []
        if captions is not None:
            found += caption_names(members, cls, captions)
        if clip_bank is not None:
            found += clip_names(members, cls, *clip_bank)
        names.append(found)
    return names
