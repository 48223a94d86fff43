"""The data helpers every model of fairbalance shares: the labelled samples of a view, image loading and sizes,
and seeding. Classifier recipes (``train``), diffusion and generators (``generate``) and hardness (``tag``) use
them from here, so no step reaches into another step's module for its data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fairbalance.core import images, validation


def image_transform(image_size: Sequence[int] | int | None, scale: str = "unit"):
    """Resize (when a size is given) + tensor in [0, 1] (``scale="unit"``) or [-1, 1] (``"symmetric"``).

    No augmentation: the bias must stay visible to the biased model.
    """
    import torchvision.transforms as T

    steps = []
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        steps.append(T.Resize(size))
    steps.append(T.ToTensor())
    if scale == "symmetric":
        steps.append(T.Normalize([0.5] * 3, [0.5] * 3))
    elif scale != "unit":
        raise ValueError(f"scale must be 'unit' or 'symmetric', not {scale!r}")
    return T.Compose(steps)


def native_size(filepaths: Sequence[str]) -> list[int]:
    """The ``[height, width]`` all images share; an error naming the sizes when they differ."""
    from PIL import Image

    validation.require_image_files(filepaths)
    sizes = {}
    for p in filepaths:
        with Image.open(p) as img:
            sizes.setdefault((img.height, img.width), p)
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w} ({p})" for (h, w), p in list(sizes.items())[:3])
        raise validation.FairBalanceError(
            f"The images have {len(sizes)} different sizes ({shown}); pass image_size to resize them to one")
    return list(next(iter(sizes)))


def load_images(filepaths: Sequence[str], image_size: Sequence[int] | int, num_workers: int = 0, progress=None,
                scale: str = "unit") -> torch.Tensor:
    """All images of a view as one float tensor (n x 3 x h x w); errors name the bad files."""
    import fiftyone.core.utils as fou

    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    out = torch.empty(len(filepaths), 3, int(h), int(w))
    with fou.ProgressBar(total=len(filepaths), progress=progress) as pb:
        for idx, batch in images.iter_batches(filepaths, image_transform((h, w), scale), batch_size=256,
                                              num_workers=num_workers):
            out[idx] = batch
            pb.update(len(idx))
    return out


def class_order(labels) -> list[str]:
    """Classes sorted numerically when they are integers, else alphabetically."""
    return sorted(set(labels), key=lambda c: (0, int(c)) if c.lstrip("-").isdigit() else (1, c))


@dataclass
class LabelledSamples:
    """The labelled samples of a view: ids, files, class indices, and which are generated."""

    ids: list[str]
    filepaths: list[str]
    labels: np.ndarray
    classes: list[str]
    generated: np.ndarray
    num_unlabelled: int

    def subset(self, keep: np.ndarray) -> "LabelledSamples":
        keep = np.asarray(keep)
        return LabelledSamples([self.ids[j] for j in keep], [self.filepaths[j] for j in keep], self.labels[keep],
                               self.classes, self.generated[keep], self.num_unlabelled)

    def real(self, required: bool = True) -> "LabelledSamples":
        """The real (non-generated) samples; with ``required``, an error when there are none."""
        real = self.subset(np.flatnonzero(~self.generated))
        if required and not real.ids:
            raise validation.FairBalanceError("The view has no real (non-generated) labelled samples")
        return real


def labelled_samples(samples, label_field: str, classes: list[str] | None = None) -> LabelledSamples:
    """The samples of ``samples`` that have a ``label_field`` label; an error when none do."""
    from fairbalance.core.fields import label_path

    path = label_path(samples, label_field)
    fields = ["id", "filepath", path]
    has_generated = samples._root_dataset.has_sample_field("generated")
    ids, paths, labels, *rest = samples.values(fields + (["generated"] if has_generated else []))
    generated = rest[0] if has_generated else [False] * len(ids)
    keep = [j for j, lab in enumerate(labels) if lab is not None]
    if not keep:
        raise validation.FairBalanceError(f"No sample in the view has a '{label_field}' label")
    labels = [str(labels[j]) for j in keep]
    classes = class_order(labels) if classes is None else list(classes)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise validation.FairBalanceError(f"Labels {unknown} are not among the classes {classes}")
    index = {c: i for i, c in enumerate(classes)}
    return LabelledSamples([ids[j] for j in keep], [paths[j] for j in keep], np.array([index[lab] for lab in labels]),
                           classes, np.array([bool(generated[j]) for j in keep]), len(ids) - len(keep))


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
