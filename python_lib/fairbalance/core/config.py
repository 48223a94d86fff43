"""Process-wide settings read from the environment."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """Where fairbalance keeps derived files (gloss embeddings, adapted WordNet).

    ``FAIRBALANCE_CACHE_DIR``, else ``$XDG_CACHE_HOME/fairbalance``, else
    ``~/.cache/fairbalance``.
    """
    path = os.environ.get("FAIRBALANCE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fairbalance"
    )
    return _usable(path, "FAIRBALANCE_CACHE_DIR")


def _usable(path: str, variable: str) -> str:
    """``path`` created if needed and writable (:func:`validation.require_writable_dir`), else an error naming
    the variable to set."""
    from fairbalance.core.validation import require_writable_dir

    return require_writable_dir(path, f"set {variable} to a writable folder")


def data_dir() -> str:
    """Where generated image files go by default (``FAIRBALANCE_DATA_DIR`` or ``~/fairbalance``)."""
    path = os.environ.get("FAIRBALANCE_DATA_DIR") or os.path.join(os.path.expanduser("~"), "fairbalance")
    return _usable(path, "FAIRBALANCE_DATA_DIR")
