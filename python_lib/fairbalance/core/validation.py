"""Up-front input checks, so bad input fails before anything is computed or written."""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Iterable, Sequence

import numpy as np



class FairBalanceError(ValueError):
    """Bad input to a fairbalance function; raised before anything is written."""


# The ceiling of every size a user can ask for, checked before any planning or work (README: "Limits"):
# far above any real use here, low enough that a typo (10**9) is refused instead of exhausting memory or
# planning for hours. Every require_positive_int(name, ...) applies the ceiling of its name.
LIMITS: dict[str, int | float] = {
    # images planned per call
    "per_class": 100_000, "per_cell": 100_000, "per_group": 100_000, "total": 1_000_000,
    "images_per_caption": 1_000, "ratio": 100.0,
    "train_per_class": 100_000, "test_per_class": 100_000, "num_val": 1_000_000, "num_test": 1_000_000,
    # per-image work
    "num_captions": 100, "max_new_tokens": 512, "num_inference_steps": 1_000, "num_related_texts": 1_000,
    # clusters
    "kmax": 1_000, "kinit": 1_000, "num_clusters": 1_000, "top_f": 10_000, "clusters_per_group": 1_000,
    # model and training sizes
    "image_size": 1_024, "resolution": 1_024, "height": 1_024, "width": 1_024, "layers_per_block": 8,
    "block_out_channels": 2_048, "projection_dim": 8_192, "rank": 1_024,
    "batch_size": 65_536, "epochs": 100_000, "head_epochs": 100_000, "steps": 10_000_000,
    "checkpoint_every": 10_000_000, "min_images": 1_000_000, "num_prior_images": 1_000_000,
    "t_edit": 1_000, "t_boost": 1_000,
    # sharding (num_shards is also at most the number of samples)
    "num_shards": 1_000, "chunk_size": 1_000_000,
    "seed": 2**32 - 1,
}


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
    if (not name or not isinstance(name, str) or name.startswith("_") or "." in name or "$" in name
            or any(c.isspace() for c in name)):
        raise FairBalanceError(f"Invalid field name {name!r}: use letters, digits and underscores")
    if name in ("id", "filepath", "tags", "metadata", "created_at", "last_modified_at"):
        raise FairBalanceError(f"Field name {name!r} is reserved by FiftyOne")


def require_positive_int(name: str, value, minimum: int = 1) -> int:
    """An integer >= ``minimum`` and at most the ceiling of ``name`` in :data:`LIMITS` (if any)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise FairBalanceError(f"{name} must be an integer >= {minimum}, got {value!r}")
    require_at_most(name, value)
    return int(value)


def require_bool(name: str, value) -> bool:
    """``True`` or ``False`` (not 1, "yes" or None): an option that switches something on or off."""
    if not isinstance(value, bool):
        raise FairBalanceError(f"{name} must be True or False, got {value!r}")
    return value


def require_at_most(name: str, value) -> None:
    """``value`` does not exceed the documented ceiling of ``name`` (:data:`LIMITS`)."""
    limit = LIMITS.get(name)
    if limit is not None and value > limit:
        raise FairBalanceError(f"{name}={value!r} is above its limit of {limit:,} (see the README's Limits)")


def require_seed(seed) -> int:
    """A seed: an integer in [0, 2**32 - 1] (NaN, floats and negatives are refused)."""
    return require_positive_int("seed", seed, minimum=0)


def require_device(device) -> None:
    """``None`` (the best available) or a device torch knows and this machine has."""
    import torch

    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise FairBalanceError(f"device={device!r} is not a device: use 'cpu', 'cuda', 'cuda:0' or 'mps'") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FairBalanceError(f"device={device!r} requested but CUDA is not available here; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FairBalanceError(f"device={device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                    and torch.backends.mps.is_available()):
        raise FairBalanceError(f"device={device!r} requested but MPS is not available here; use device='cpu'")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise FairBalanceError(f"device={device!r} is not supported: use 'cpu', 'cuda' or 'mps'")


def require_tag(name: str, tag) -> str:
    """A sample tag: a non-empty string without surrounding whitespace."""
    if not isinstance(tag, str) or not tag.strip() or tag != tag.strip():
        raise FairBalanceError(f"{name} must be a non-empty tag without leading/trailing spaces, got {tag!r}")
    return tag


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


def require_writable_dir(folder: str, remedy: str = "choose another output_dir") -> str:
    """Create ``folder`` if needed and check it is writable, before any work is done; an error says ``remedy``.

    The one rule for every folder fairbalance writes: output folders, and the data and cache folders
    (:mod:`fairbalance.core.config`, whose remedy names the variable to set)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FairBalanceError(f"Output folder {folder} is a file, not a folder; {remedy}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise FairBalanceError(f"Cannot create output folder {folder}: {e}; {remedy}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FairBalanceError(f"Output folder {folder} is not writable; {remedy}")
    return folder


class DiskWriteError(FairBalanceError):
    """A model or checkpoint could not be written: the disk is full, a quota or file-size limit was hit."""


@contextlib.contextmanager
def disk_write(what: str, folder: str):
    """Turn "no space left"-kind OS errors while writing ``what`` into one error that says where and what to do.

    Writes inside are atomic (temp file + rename), so the previous complete
    file or checkpoint is still in place: freeing space and rerunning resumes.
    """
    try:
        yield
    except OSError as e:
        if e.errno not in _DISK_FULL_ERRNOS:
            raise
        raise DiskWriteError(
            f"Could not write {what} in {folder}: {os.strerror(e.errno)}. Free space there (or choose another "
            "output folder) and run again: the last complete checkpoint is kept, so training resumes from it") from e
    except Exception as e:  # torch's zip writer and safetensors report a failed write in their own words
        if not any(words in str(e) for words in _DISK_FULL_WORDS):
            raise
        raise DiskWriteError(
            f"Could not write {what} in {folder} ({e}). Free space there (or choose another output folder) and "
            "run again: the last complete checkpoint is kept, so training resumes from it") from e


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_WORDS = ("file write failed", "unexpected pos", "No space left", "File too large", "Disk quota")
