"""The repaired dataset handed to a trainer outside FiftyOne, with the provenance of every image.

``export_samples`` writes a view through FiftyOne's own exporters
(``ImageClassificationDirectoryTree``, ``FiftyOneDataset``) or as a CSV
manifest over the media in place, and always a ``manifest.csv`` that says,
per image: label, real or generated, the run that generated it and its
source sample, its filter score and its sample weight. ``TorchImageDataset``
serves a view to a PyTorch training loop (image, label index, weight).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from fairbalance import validation
from fairbalance.fields import label_path

FORMATS = ("image-classification-dir", "fiftyone", "csv-manifest")
MANIFEST = "manifest.csv"
EXPORT_OWNER = "export"  # the owner "run key" of an export folder (one dataset's exports, see folders.py)
COLUMNS = ("id", "filepath", "original_filepath", "label", "generated", "generation_run", "source_id",
           "filter_score", "weight", "tags")


@dataclass
class ExportResult:
    output_dir: str
    format: str
    num_samples: int
    num_generated: int
    num_excluded: int
    manifest: str
    classes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _training_view(samples, label_field: str, include_generated: bool, exclude_tags: Sequence[str] | None):
    from fiftyone import ViewField as Fv

    view = samples.exists(label_path(samples, label_field))
    if not include_generated and samples._root_dataset.has_field("generated"):
        view = view.match(Fv("generated") != True)  # noqa: E712
    if exclude_tags:
        view = view.match_tags(list(exclude_tags), bool=False)
    return view


def export_samples(
    samples,
    output_dir: str,
    format: str = "image-classification-dir",
    label_field: str = "ground_truth",
    include_generated: bool = True,
    exclude_tags: Sequence[str] | None = None,
    weights_field: str | None = None,
    score_field: str = "generation_score",
    overwrite: bool = False,
    progress=None,
) -> ExportResult:
    """Write ``samples`` for training elsewhere, plus ``manifest.csv`` with each image's provenance.

    ``format``: ``image-classification-dir`` (one folder per class, images
    copied), ``fiftyone`` (FiftyOne's own format: every field, re-importable
    with ``fo.Dataset.from_dir``) or ``csv-manifest`` (no copies: the
    manifest points at the media where they are). Samples without a label
    are left out; ``include_generated=False`` leaves out generated samples;
    ``exclude_tags`` leaves out samples with any of those tags (e.g. the
    ``low_quality`` tag of :func:`filter_generated`). ``weights_field`` (a
    numeric field) fills the manifest's weight column (1.0 otherwise). A
    non-empty ``output_dir`` is refused unless ``overwrite``.
    """
    import fiftyone as fo

    from fairbalance import folders

    validation.require_nonempty(samples)
    if format not in FORMATS:
        raise validation.FairBalanceError(f"format must be one of {FORMATS}, not {format!r}")
    validation.require_fields(samples, [label_field] + ([weights_field] if weights_field else []))
    label_path(samples, label_field)  # a class field, refused before anything is touched
    _require_weights(samples, weights_field)
    view = _training_view(samples, label_field, include_generated, exclude_tags)
    if not len(view):
        raise validation.FairBalanceError("No sample left to export (no label, or all excluded)")
    # checked before anything is deleted: the folder is new, empty or this dataset's export folder, and overwrite
    # deletes only what an export recorded there (never a user's file, never the folder)
    if os.path.isdir(output_dir) and folders.listed(output_dir) and not overwrite:
        raise validation.FairBalanceError(f"{output_dir} is not empty; pass overwrite=True to replace it")
    output_dir = folders.claim_output_folder(output_dir, samples._root_dataset, EXPORT_OWNER, overwrite)
    before = set(os.listdir(output_dir))
    folders.record(output_dir, [MANIFEST, MANIFEST + ".tmp"] + [str(c) for c in view.distinct(
        label_path(samples, label_field))] if format == "image-classification-dir" else [MANIFEST, MANIFEST + ".tmp"])
    path = label_path(samples, label_field)
    if format == "image-classification-dir":
        exporter = _RecordingDirectoryTreeExporter(output_dir)
        view.export(dataset_exporter=exporter, label_field=label_field, progress=progress)
        exported = exporter.paths
    elif format == "fiftyone":
        view.export(export_dir=output_dir, dataset_type=fo.types.FiftyOneDataset, progress=progress)
        exported = {}
    else:
        os.makedirs(output_dir, exist_ok=True)
        exported = {}
    rows = _manifest_rows(view, path, weights_field, score_field, exported)
    manifest = os.path.join(output_dir, MANIFEST)
    tmp = manifest + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, manifest)
    folders.record(output_dir, sorted(set(os.listdir(output_dir)) - before))  # what FiftyOne's exporter wrote
    return ExportResult(output_dir, format, len(rows), sum(r["generated"] for r in rows), len(samples) - len(rows),
                        manifest, sorted({r["label"] for r in rows}))


def _require_weights(samples, weights_field: str | None) -> None:
    """Weights are finite numbers >= 0 (or missing: 1.0); NaN or negative ones reached the manifest and the loss."""
    if not weights_field:
        return
    bad = [v for v in samples.values(weights_field) if v is not None and (
        isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0)]
    if bad:
        raise validation.FairBalanceError(
            f"'{weights_field}' has {len(bad)} weight(s) that are not finite numbers >= 0 (e.g. {bad[0]!r}); "
            "fix or clear them before exporting")


def _manifest_rows(view, path: str, weights_field, score_field: str, exported: dict) -> list[dict]:
    has = view._root_dataset.has_field
    fields = ["id", "filepath", path, "tags"]
    optional = {"generated": "generated", "generation_run": "generation.run_key", "source_id": "generation.source_id",
                "filter_score": score_field, "weight": weights_field}
    present = {k: p for k, p in optional.items() if p and has(p.split(".")[0])}
    cols = dict(zip(fields + list(present), view.values(fields + list(present.values()))))
    rows = []
    for j, sample_id in enumerate(cols["id"]):
        original = cols["filepath"][j]
        get = lambda k: cols[k][j] if k in cols else None  # noqa: E731
        weight = get("weight")
        rows.append({"id": sample_id, "filepath": exported.get(original, original), "original_filepath": original,
                     "label": str(cols[path][j]), "generated": bool(get("generated")),
                     "generation_run": get("generation_run") or "", "source_id": get("source_id") or "",
                     "filter_score": "" if get("filter_score") is None else float(get("filter_score")),
                     "weight": 1.0 if weight is None else float(weight), "tags": ";".join(cols["tags"][j])})
    return rows


def _recording_exporter_class():
    from fiftyone.utils.data.exporters import ImageClassificationDirectoryTreeExporter

    class Recording(ImageClassificationDirectoryTreeExporter):
        """FiftyOne's directory-tree exporter that also remembers where each image went (for the manifest)."""

        def setup(self):
            super().setup()
            self.paths = {}
            export = self._media_exporter.export

            def recording_export(media_or_path, outpath=None, **kwargs):
                self.paths[media_or_path] = outpath
                return export(media_or_path, outpath=outpath, **kwargs)

            self._media_exporter.export = recording_export

    return Recording


def _RecordingDirectoryTreeExporter(output_dir):  # noqa: N802 (a class built lazily: fiftyone imports late)
    return _recording_exporter_class()(output_dir)


class TorchImageDataset(torch.utils.data.Dataset):
    """A view as a PyTorch dataset: ``(image tensor, class index, weight)`` per sample.

    Images load as RGB in [0, 1] (``transform`` replaces that: a callable on
    a PIL image); ``classes`` fixes the class order (default: sorted labels);
    weights come from ``weights_field`` (1.0 otherwise). Use with
    ``torch.utils.data.DataLoader`` and ``WeightedRandomSampler`` or a
    weighted loss.
    """

    def __init__(self, samples, label_field: str = "ground_truth", weights_field: str | None = None,
                 transform: Callable | None = None, classes: Sequence[str] | None = None,
                 include_generated: bool = True, exclude_tags: Sequence[str] | None = None):
        from fairbalance import images

        validation.require_nonempty(samples)
        validation.require_fields(samples, [label_field] + ([weights_field] if weights_field else []))
        _require_weights(samples, weights_field)
        view = _training_view(samples, label_field, include_generated, exclude_tags)
        if not len(view):
            raise validation.FairBalanceError("No labelled sample in the view")
        paths, labels = view.values(["filepath", label_path(samples, label_field)])
        labels = [str(v) for v in labels]
        self.classes = list(classes) if classes is not None else sorted(set(labels))
        unknown = sorted(set(labels) - set(self.classes))
        if unknown:
            raise validation.FairBalanceError(f"labels {unknown} are not in classes {self.classes}")
        index = {c: i for i, c in enumerate(self.classes)}
        self.filepaths = paths
        self.targets = np.array([index[v] for v in labels], dtype=np.int64)
        w = view.values(weights_field) if weights_field else [None] * len(paths)
        self.weights = np.array([1.0 if v is None else float(v) for v in w], dtype=np.float32)
        validation.require_image_files(paths)
        self._load = images.load_rgb
        self.transform = transform

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, i: int):
        img = self._load(self.filepaths[i])
        if self.transform is not None:
            x = self.transform(img)
        else:
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return x, int(self.targets[i]), float(self.weights[i])
