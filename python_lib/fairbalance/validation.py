"""Up-front input checks, so bad input fails before anything is computed or written."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np



class FairBalanceError(ValueError):
    """Bad input to a fairbalance function; raised before anything is written."""


def require_nonempty(samples) -> None:
    """Reject empty collections (the commonest silent no-op); stops at the first sample, not a full count."""
    if len(samples.limit(1)) == 0:
        raise FairBalanceError("The view is empty: select at least one sample")


def count_samples(samples) -> int:
    """The number of samples, from a real query.

    FiftyOne answers ``len()`` of a whole dataset (or of a view without
    stages) with MongoDB's *estimated* count, which is stale after a mongod
    crash (0 while documents exist); decisions (skip existing, resume) must
    not rest on it. Counting the ``id`` field aggregates over the documents.
    """
    return int(samples.count("id"))


def require_image_collection(samples) -> None:
    """Reject video/3D/grouped collections; we work on images only."""
    import fiftyone.core.validation as fov

    fov.validate_image_collection(samples)


def require_fields(samples, fields: Iterable[str]) -> None:
    """Every field must exist in the collection's schema."""
    schema = samples.get_field_schema(flat=True)
    missing = [f for f in fields if f not in schema]
    if missing:
        available = ", ".join(sorted(k for k in schema if "." not in k))
        raise FairBalanceError(
            f"Field(s) {', '.join(repr(m) for m in missing)} not found; available fields: {available}"
        )


def require_field_name(name: str) -> None:
    """A writable top-level field name."""
    if not name or not isinstance(name, str) or name.startswith("_") or "." in name or "$" in name:
        raise FairBalanceError(f"Invalid field name {name!r}: use letters, digits and underscores")
    if name in ("id", "filepath", "tags", "metadata", "created_at", "last_modified_at"):
        raise FairBalanceError(f"Field name {name!r} is reserved by FiftyOne")


def require_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise FairBalanceError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def require_finite_matrix(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim != 2:
        raise FairBalanceError(f"{name} must be a 2-D array, got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise FairBalanceError(f"{name} has NaN/inf values in {int(bad.sum())} row(s)")
    return x


def require_image_files(filepaths: Sequence[str]) -> None:
    """Every file exists (cheap check; decoding errors surface while loading)."""
    missing = [p for p in filepaths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise FairBalanceError(f"{len(missing)} image file(s) not found: {shown}")


def require_writable_dir(folder: str) -> str:
    """Create ``folder`` if needed and check it is writable, before any work is done."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise FairBalanceError(f"Cannot create output folder {folder}: {e}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FairBalanceError(f"Output folder {folder} is not writable")
    return folder
