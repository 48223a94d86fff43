"""Colored Digits: a real, reproducible bias benchmark built from the
handwritten digits that ship with scikit-learn.

It follows the Colored MNIST protocol of the debiasing literature (LfF):
every class has a colour; a *bias-aligned* training image is painted with its
class colour (plus a little colour noise), a *bias-conflicting* one with the
colour of another class. The fraction of conflicting training images is set
by ``conflict_ratio`` (0.5%, 1%, 2%, 5% in the literature); the test split is
unbiased (colours uniform over the classes). A classifier that learns colour
instead of shape does well on train and badly on test.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from fairbalance.core import claims, folders, validation

#: One colour per class, far apart in RGB (name, RGB).
CLASS_COLORS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (230, 25, 75)),
    ("green", (60, 180, 75)),
    ("yellow", (255, 225, 25)),
    ("blue", (0, 130, 200)),
    ("orange", (245, 130, 48)),
    ("purple", (145, 30, 180)),
    ("cyan", (70, 240, 240)),
    ("magenta", (240, 50, 230)),
    ("lime", (210, 245, 60)),
    ("teal", (0, 128, 128)),
)


@dataclass(frozen=True)
class ColoredDigitsConfig:
    """Everything that determines the dataset; stored in ``dataset.info``."""

    num_classes: int = 10
    train_per_class: int = 500
    test_per_class: int = 100
    conflict_ratio: float = 0.01
    image_size: int = 32
    color_std: float = 0.05
    test_fraction: float = 0.3
    seed: int = 0

    def validate(self) -> None:
        if not 2 <= self.num_classes <= len(CLASS_COLORS):
            raise validation.FairBalanceError(f"num_classes must be in 2..{len(CLASS_COLORS)}")
        validation.require_positive_int("train_per_class", self.train_per_class)
        validation.require_positive_int("test_per_class", self.test_per_class)
        validation.require_positive_int("image_size", self.image_size, minimum=8)
        if not 0.0 <= self.conflict_ratio < 1.0:
            raise validation.FairBalanceError("conflict_ratio must be in [0, 1)")
        if not 0.0 < self.test_fraction < 1.0:
            raise validation.FairBalanceError("test_fraction must be in (0, 1)")
        if self.color_std < 0:
            raise validation.FairBalanceError("color_std must be >= 0")


def stroke_color(rgb: np.ndarray) -> np.ndarray:
    """Mean RGB (0..1) of an image's strongest stroke pixels (within 80% of its brightest), background ignored."""
    a = np.asarray(rgb, dtype=np.float32)
    a = a / 255.0 if a.max() > 1.0 else a
    intensity = a.max(-1)
    strokes = a[intensity >= 0.8 * intensity.max()] if intensity.max() > 0 else a.reshape(-1, 3)
    return strokes.mean(0)


def nearest_color(image, num_classes: int = len(CLASS_COLORS)) -> str:
    """The palette colour an image shows: its stroke colour's nearest ``CLASS_COLORS`` entry, by name.

    ``image``: a file path, a PIL image or an H x W x 3 array. Used to read
    off what generated images show, independently of what they were asked for.
    """
    from fairbalance.core import images

    if isinstance(image, str):
        image = images.load_rgb(image)
    color = stroke_color(np.asarray(image))
    palette = np.array([rgb for _, rgb in CLASS_COLORS[:num_classes]], dtype=np.float32) / 255.0
    return CLASS_COLORS[int(np.argmin(((palette - color) ** 2).sum(1)))][0]


def confirm_colors(samples, field: str) -> tuple[int, int] | None:
    """How many of ``samples`` show the palette colour their ``field`` names, and of how many.

    An independent check of generated images' condition: what each image
    shows is read off its strokes (:func:`nearest_color`), not from the
    model. None when ``field`` holds anything but palette colour names (no
    such check for it).
    """
    names = {name for name, _ in CLASS_COLORS}
    pairs = [(p, v) for p, v in zip(*samples.values(["filepath", f"{field}.label"])) if v is not None]
    if not pairs or not all(v in names for _, v in pairs):
        return None
    return sum(nearest_color(p) == v for p, v in pairs), len(pairs)


def num_conflicting(per_class: int, ratio: float) -> int:
    """Conflicting images per class: ``ratio * per_class`` rounded half up, at least 1 if ratio > 0."""
    if ratio <= 0:
        return 0
    return max(1, math.floor(ratio * per_class + 0.5))


def _split_sources(targets: np.ndarray, cfg: ColoredDigitsConfig, rng: np.random.Generator):
    """Disjoint train/test pools of source digits per class."""
    pools = {}
    for c in range(cfg.num_classes):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_test = max(1, int(round(len(idx) * cfg.test_fraction)))
        pools[c] = (idx[n_test:], idx[:n_test])
    return pools


def _render(digit: np.ndarray, rgb: np.ndarray, size: int, augment: bool, rng: np.random.Generator) -> Image.Image:
    """Upscale an 8x8 digit (0..16) to ``size`` px and paint its strokes with ``rgb`` (0..1)."""
    gray = Image.fromarray((digit * (255.0 / 16.0)).astype(np.uint8), mode="L")
    gray = gray.resize((size, size), Image.BILINEAR)
    if augment:
        shift = size / 8.0
        gray = gray.rotate(
            float(rng.uniform(-12, 12)),
            resample=Image.BILINEAR,
            translate=(float(rng.uniform(-shift, shift)), float(rng.uniform(-shift, shift))),
        )
    strokes = np.asarray(gray, dtype=np.float32) / 255.0
    img = np.clip(strokes[..., None] * rgb[None, None, :] * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(img, mode="RGB")


def _plan_split(pool, n_per_class, n_conflict, cfg, rng, unbiased, color_probs=None):
    """(source index, class, colour id, augmented) for every image of a split, shuffled."""
    plan = []
    for c, sources in pool.items():
        picks = np.concatenate([rng.permutation(sources) for _ in range(math.ceil(n_per_class / len(sources)))])
        picks = picks[:n_per_class]
        seen = set()
        if unbiased:
            colors = rng.integers(0, cfg.num_classes, size=n_per_class)
        elif color_probs is not None:
            colors = rng.choice(cfg.num_classes, size=n_per_class, p=color_probs)
        else:
            colors = np.full(n_per_class, c)
            conflict_at = rng.choice(n_per_class, size=n_conflict, replace=False)
            others = [k for k in range(cfg.num_classes) if k != c]
            colors[conflict_at] = rng.choice(others, size=n_conflict)
        for src, col in zip(picks, colors):
            plan.append((int(src), c, int(col), int(src) in seen))
            seen.add(int(src))
    order = rng.permutation(len(plan))
    return [plan[i] for i in order]


@claims.exclusive
def colored_digits(
    name: str = "colored-digits",
    output_dir: str | None = None,
    num_classes: int = 10,
    train_per_class: int = 500,
    test_per_class: int = 100,
    conflict_ratio: float = 0.01,
    image_size: int = 32,
    color_std: float = 0.05,
    seed: int = 0,
    color_distribution: list[float] | None = None,
    persistent: bool = True,
    overwrite: bool = False,
    progress=None,
):
    """Build the Colored Digits dataset into FiftyOne and return it.

    Images are PNG files under ``output_dir`` (default
    ``$FAIRBALANCE_DATA_DIR/colored_digits/<name>``). Samples get
    ``ground_truth`` (digit, ``fo.Classification``), ``color`` (the bias
    attribute, ``fo.Classification``), ``bias_aligned`` (bool),
    ``source_index`` (row in ``sklearn.datasets.load_digits``) and a
    ``train``/``test`` tag. Source digits of the two splits are disjoint;
    a source reused within a split is augmented (small rotation and shift).
    The same arguments give the same files and labels.

    ``color_distribution`` (one weight per class colour) instead draws every
    training image's colour from that distribution, independently of its
    digit: an *implicit* imbalance in the colour attribute with no class
    correlation (the setting of Suayama & Nakamura); ``conflict_ratio`` is
    then unused.
    """
    import fiftyone as fo
    import fiftyone.core.utils as fou
    from sklearn.datasets import load_digits

    cfg = ColoredDigitsConfig(
        num_classes, train_per_class, test_per_class, conflict_ratio, image_size, color_std, seed=seed
    )
    cfg.validate()
    color_probs = _color_probs(color_distribution, num_classes)
    if fo.dataset_exists(name):
        if not overwrite:
            raise validation.FairBalanceError(f"Dataset '{name}' already exists; pass overwrite=True to rebuild it")
    # a dataset name may hold "../": the default folder is sanitised and stays under the data folder
    output_dir = os.path.abspath(output_dir or folders.default_folder("colored_digits", name))

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pools = _split_sources(digits.target, cfg, rng)
    palette = np.array([rgb for _, rgb in CLASS_COLORS[:num_classes]], dtype=np.float32) / 255.0
    plans = {
        "train": _plan_split(
            {c: p[0] for c, p in pools.items()}, train_per_class,
            num_conflicting(train_per_class, conflict_ratio), cfg, rng, unbiased=False, color_probs=color_probs,
        ),
        "test": _plan_split(
            {c: p[1] for c, p in pools.items()}, test_per_class, 0, cfg, rng, unbiased=True,
        ),
    }

    folders.prepare_split_folders(output_dir, name, "colored_digits", tuple(plans))
    if fo.dataset_exists(name):
        fo.delete_dataset(name)

    samples = []
    total = sum(len(p) for p in plans.values())
    with fou.ProgressBar(total=total, progress=progress) as pb:
        for split, plan in plans.items():
            for i, (src, label, color, augment) in enumerate(plan):
                rgb = np.clip(palette[color] + rng.normal(0.0, color_std, size=3), 0.0, 1.0)
                img = _render(digits.images[src], rgb, image_size, augment, rng)
                path = os.path.join(output_dir, split, f"{i:05d}.png")
                img.save(path)
                samples.append(
                    fo.Sample(
                        filepath=path,
                        tags=[split],
                        ground_truth=fo.Classification(label=str(label)),
                        color=fo.Classification(label=CLASS_COLORS[color][0]),
                        bias_aligned=bool(color == label),
                        source_index=src,
                    )
                )
                pb.update()

    dataset = fo.Dataset(name, persistent=persistent)
    dataset.add_samples(samples, progress=False)
    dataset.info["colored_digits"] = {
        **asdict(cfg), "output_dir": output_dir,
        "color_distribution": None if color_probs is None else color_probs.tolist(),
    }
    dataset.classes["ground_truth"] = [str(c) for c in range(num_classes)]
    dataset.classes["color"] = [n for n, _ in CLASS_COLORS[:num_classes]]
    dataset.save()
    dataset.compute_metadata(progress=False)
    return dataset


def _color_probs(color_distribution, num_classes: int) -> np.ndarray | None:
    """The training colours' distribution (``color_distribution`` normalised), checked; None when not given."""
    if color_distribution is None:
        return None
    w = np.asarray(color_distribution, dtype=float)
    if w.shape != (num_classes,) or np.any(w < 0) or w.sum() <= 0:
        raise validation.FairBalanceError(f"color_distribution needs {num_classes} non-negative weights")
    return w / w.sum()
