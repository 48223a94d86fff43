"""Streaming, batched image loading for models (a torch DataLoader with workers).

Every image is converted to 8-bit RGB: grayscale, palette, RGBA/LA
(composited on black), CMYK and 16-bit/32-bit integer or float images are
handled. Unreadable files are reported per sample; with ``skip_failures``
they are left out, otherwise loading stops with one error naming them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from fairbalance.core import validation


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode (16-bit and float images are rescaled, alpha composited on black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB, raising a clear error when it cannot be decoded."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises many types for corrupt files
        raise OSError(f"cannot decode image {path}: {e}") from e


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, filepaths: Sequence[str], transform: Callable):
        self.filepaths = list(filepaths)
        self.transform = transform

    def __len__(self):
        return len(self.filepaths)

    def __getitem__(self, i):
        try:
            return i, self.transform(load_rgb(self.filepaths[i])), None
        except Exception as e:
            return i, None, f"{type(e).__name__}: {e}"


def _collate(items):
    ok = [(i, x) for i, x, err in items if err is None]
    failed = [(i, err) for i, _, err in items if err is not None]
    idx = [i for i, _ in ok]
    batch = torch.stack([x for _, x in ok]) if ok else None
    return idx, batch, failed


def default_num_workers() -> int:
    """Loader workers: one fewer than the cores, at most 8 (0 = load in the main process)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


@dataclass
class LoadReport:
    """Which images could not be loaded, by position in the input list."""

    failures: dict[int, str] = field(default_factory=dict)


def iter_batches(
    filepaths: Sequence[str],
    transform: Callable,
    batch_size: int = 64,
    num_workers: int | None = None,
    skip_failures: bool = False,
    report: LoadReport | None = None,
    pin_memory: bool = False,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(positions, batch)`` of transformed images, in order."""
    report = report if report is not None else LoadReport()
    if not skip_failures:
        validation.require_image_files(filepaths)  # missing files: one clear error before any work
    workers = default_num_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(
        _ImageFiles(filepaths, transform),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
    for idx, batch, failed in loader:
        for i, err in failed:
            report.failures[i] = err
        if failed and not skip_failures:
            shown = "; ".join(f"{filepaths[i]} ({err})" for i, err in failed[:3])
            raise validation.FairBalanceError(
                f"{len(failed)} image(s) could not be loaded: {shown}. Fix or remove them, or pass skip_failures=True"
            )
        if batch is not None:
            yield idx, batch
