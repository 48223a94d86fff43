"""The repaired dataset handed to a trainer outside FiftyOne, with the provenance of every image.

``export_samples`` writes a view through FiftyOne's own exporters
(``ImageClassificationDirectoryTree``, ``FiftyOneDataset``) or as a CSV
manifest over the media in place, and always a ``manifest.csv`` that says,
per image: label, real or generated, the run that generated it and its
source sample, its filter score and its sample weight, plus ``runs.json``
(every run that made the exported samples, with its settings and model
fingerprint) and ``excluded.csv`` (each sample left out, and why).
``TorchImageDataset`` serves a view (or an export's manifest) to a PyTorch
training loop (image, label index, weight), all images at one size.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from fairbalance.core import claims, validation
from fairbalance.core.fields import label_path

FORMATS = ("image-classification-dir", "fiftyone", "csv-manifest")
MANIFEST = "manifest.csv"
EXPORT_OWNER = "export"  # the owner "run key" of an export folder (one dataset's exports, see folders.py)
RUNS_FILE = "runs.json"
EXCLUDED_FILE = "excluded.csv"
COLUMNS = ("id", "filepath", "original_filepath", "label", "generated", "generation_run", "source_id",
           "filter_score", "weight", "tags", "source_filepath", "cell", "seed", "model_step", "width", "height")
# generated samples' provenance (the ``generation`` field every generator writes) -> manifest column
PROVENANCE_COLUMNS = {"generation_run": "run_key", "source_id": "source_id", "source_filepath": "source_filepath",
                      "cell": "cell", "seed": "seed", "model_step": "model_step"}


@dataclass
class ExportResult:
    output_dir: str
    format: str
    num_samples: int
    num_generated: int
    num_excluded: int
    manifest: str
    classes: list[str]
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> samples left out for it
    runs_file: str = ""
    image_sizes: dict[str, int] = field(default_factory=dict)  # "WxH" -> exported images of that size
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file header (no decoding)."""
    from PIL import Image

    with Image.open(path) as img:
        return img.size


def _exclusions(samples, label_field: str, include_generated: bool, exclude_tags: Sequence[str] | None):
    """``(kept ids, [(id, filepath, reason)])``: every sample of ``samples`` is kept or left out for one reason."""
    path = label_path(samples, label_field)
    has_gen = samples._root_dataset.has_field("generated")
    fields = ["id", "filepath", "tags", path] + (["generated"] if has_gen else [])
    cols = samples.values(fields)
    gen = cols[4] if has_gen else [None] * len(cols[0])
    drop_tags = set(exclude_tags or ())
    kept, excluded = [], []
    for sid, fp, tags, label, g in zip(cols[0], cols[1], cols[2], cols[3], gen):
        hit = sorted(drop_tags.intersection(tags or ()))
        if g and not include_generated:
            reason = "generated (include_generated=False)"
        elif hit:
            reason = f"tag '{hit[0]}' (exclude_tags)"
        elif label is None:
            reason = f"{'generated' if g else 'real'} sample without '{label_field}'"
        else:
            kept.append(sid)
            continue
        excluded.append((sid, fp, reason))
    return kept, excluded


def _model_fingerprint(folder: str, full_hash_limit: int = 1 << 30) -> dict:
    """A fingerprint of a model folder: sha1 over every file's relative path and content (sizes only above 1 GiB)."""
    if not folder or not os.path.isdir(folder):
        return {"folder": folder, "exists": False}
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    total = sum(os.path.getsize(f) for f in files)
    h = hashlib.sha1()
    for f in files:
        h.update(os.path.relpath(f, folder).encode() + b"\0" + str(os.path.getsize(f)).encode())
        if total <= full_hash_limit:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return {"folder": folder, "exists": True, "sha1": h.hexdigest(), "files": len(files), "bytes": total,
            "content_hashed": total <= full_hash_limit}


def _runs_record(samples, run_keys: Sequence[str]) -> dict:
    """Every run that made the exported samples, with its full config, results summary and model fingerprint."""
    from fairbalance.core import runs

    dataset = samples._root_dataset
    out = {}
    for key in sorted(set(run_keys)):
        if not key or not dataset.has_run(key):
            out[key] = {"missing": True}
            continue
        config = runs.get_run_config(dataset, key)
        info = dataset.get_run_info(key)
        record = {"config": runs.jsonable(config), "timestamp": str(info.timestamp)}
        results = runs.load_run_results(dataset, key)
        record["results"] = {k: v for k, v in runs.jsonable(results).items()
                             if len(json.dumps(v, default=str)) < 2000}
        model = config.get("model") or config.get("model_dir") or config.get("base_model")
        if isinstance(model, str):
            record["model"] = _model_fingerprint(model)
        out[key] = record
    return {"dataset": dataset.name, "runs": out}


def _training_view(samples, label_field: str, include_generated: bool, exclude_tags: Sequence[str] | None):
    from fiftyone import ViewField as Fv

    view = samples.exists(label_path(samples, label_field))
    if not include_generated and samples._root_dataset.has_field("generated"):
        view = view.match(Fv("generated") != True)  # noqa: E712
    if exclude_tags:
        view = view.match_tags(list(exclude_tags), bool=False)
    return view


@claims.exclusive  # the output folder is claimed while it is written: a second export into it is refused
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
    from fairbalance.core import folders


    validation.require_nonempty(samples)
    if format not in FORMATS:
        raise validation.FairBalanceError(f"format must be one of {FORMATS}, not {format!r}")
    validation.require_fields(samples, [label_field] + ([weights_field] if weights_field else []))
    path = label_path(samples, label_field)  # a class field, refused before anything is touched
    _require_weights(samples, weights_field)
    _, excluded = _exclusions(samples, label_field, include_generated, exclude_tags)
    unlabelled = [e for e in excluded if e[2].startswith("generated sample without")]
    if unlabelled:  # asked for, but they would vanish: say so before writing anything
        from fiftyone import ViewField as Fv

        gen_runs = sorted(set(samples.match(Fv("generated") == True).exists(  # noqa: E712
            path, False).distinct("generation.run_key")) - {None}) \
            if samples._root_dataset.has_field("generation") else []
        raise validation.FairBalanceError(
            f"{len(unlabelled)} generated sample(s) (run(s) {gen_runs}) have no '{label_field}' and would be left "
            f"out of the export: give the label field they carry (label_field=..., --label-field), or leave them "
            f"out on purpose with include_generated=False (--no-include-generated)")
    view = _training_view(samples, label_field, include_generated, exclude_tags)  # the kept ones, by filters
    if not len(view):
        raise validation.FairBalanceError(f"No sample left to export: {dict(Counter(e[2] for e in excluded))}")
    # checked before anything is deleted: the folder is new, empty or this dataset's export folder (an export there
    # is replaced only with overwrite), and overwrite deletes only what an export recorded (never a user's file)
    output_dir = folders.claim_output_folder(output_dir, samples._root_dataset, EXPORT_OWNER, overwrite, reuse=False)
    before = set(os.listdir(output_dir))
    own_files = [n + t for n in (MANIFEST, RUNS_FILE, EXCLUDED_FILE) for t in ("", ".tmp")]
    folders.record(output_dir, own_files + ([str(c) for c in view.distinct(path)]
                                            if format == "image-classification-dir" else []))
    if format == "image-classification-dir":
        exporter = _RecordingDirectoryTreeExporter(output_dir)
        view.export(dataset_exporter=exporter, label_field=label_field, progress=progress)
        exported = exporter.paths
    elif format == "fiftyone":
        _export_fiftyone_with_runs(view, output_dir, progress)
        exported = {}
    else:
        os.makedirs(output_dir, exist_ok=True)
        exported = {}
    rows = _manifest_rows(view, path, weights_field, score_field, exported)
    sizes = Counter(f"{r['width']}x{r['height']}" for r in rows)
    notes = []
    if len(sizes) > 1:
        real = Counter(f"{r['width']}x{r['height']}" for r in rows if not r["generated"]) or sizes
        notes.append(f"exported images have {len(sizes)} sizes {dict(sizes)}: a DataLoader needs one; "
                     f"TorchImageDataset.from_manifest(...) resizes to the real images' {real.most_common(1)[0][0]} "
                     "(or pass image_size=)")
    manifest = os.path.join(output_dir, MANIFEST)
    _write_csv(manifest, COLUMNS, rows)
    excluded_path = os.path.join(output_dir, EXCLUDED_FILE)
    _write_csv(excluded_path, ("id", "filepath", "reason"),
               [{"id": i, "filepath": fp, "reason": r} for i, fp, r in excluded])
    runs_path = os.path.join(output_dir, RUNS_FILE)
    record = _runs_record(samples, [r["generation_run"] for r in rows if r["generation_run"]])
    record.update(label_field=label_field, format=format, num_samples=len(rows),
                  excluded=dict(Counter(e[2] for e in excluded)), image_sizes=dict(sizes))
    with open(runs_path + ".tmp", "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(runs_path + ".tmp", runs_path)
    folders.record(output_dir, sorted(set(os.listdir(output_dir)) - before))  # what FiftyOne's exporter wrote
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return ExportResult(output_dir, format, len(rows), sum(r["generated"] for r in rows), len(excluded),
                        manifest, sorted({r["label"] for r in rows}), dict(Counter(e[2] for e in excluded)),
                        runs_path, dict(sizes), notes)


def _export_fiftyone_with_runs(view, output_dir: str, progress) -> None:
    """FiftyOne's format with the dataset's run records (FiftyOne writes runs only for a whole dataset: the
    selected samples go through a temporary clone that gets the runs, so ``fo.Dataset.from_dir`` has them)."""
    import datetime

    import fiftyone as fo
    import fiftyone.core.dataset as fod

    root = view._root_dataset
    if not root.has_runs or not hasattr(fod, "_clone_extras"):
        view.export(export_dir=output_dir, dataset_type=fo.types.FiftyOneDataset, progress=progress)
        return
    clone = view.clone()
    try:
        fod._clone_extras(root, clone, datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
        clone.export(export_dir=output_dir, dataset_type=fo.types.FiftyOneDataset, progress=progress)
    finally:
        clone.delete()


def _write_csv(path: str, columns: Sequence[str], rows: list[dict]) -> None:
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)


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
    optional = {"generated": "generated", "filter_score": score_field, "weight": weights_field}
    optional.update({col: f"generation.{key}" for col, key in PROVENANCE_COLUMNS.items()})
    present = {k: p for k, p in optional.items() if p and has(p.split(".")[0])}
    cols = dict(zip(fields + list(present), view.values(fields + list(present.values()))))
    rows = []
    for j, sample_id in enumerate(cols["id"]):
        original = cols["filepath"][j]
        get = lambda k: cols[k][j] if k in cols else None  # noqa: E731
        weight = get("weight")
        width, height = _image_size(original)
        row = {"id": sample_id, "filepath": exported.get(original, original), "original_filepath": original,
               "label": str(cols[path][j]), "generated": bool(get("generated")),
               "filter_score": "" if get("filter_score") is None else float(get("filter_score")),
               "weight": 1.0 if weight is None else float(weight), "tags": ";".join(cols["tags"][j]),
               "width": width, "height": height}
        row.update({col: "" if get(col) is None else get(col) for col in PROVENANCE_COLUMNS})
        rows.append(row)
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

    Images load as RGB in [0, 1] at one size, so a plain ``DataLoader``
    stacks them: ``image_size`` (an int or ``(width, height)``), by default
    the most common size of the real images (generated images made at the
    diffusion model's size are resized, with a warning). ``transform``
    replaces the loading (a callable on a PIL image); ``classes`` fixes the
    class order (default: sorted labels); weights come from
    ``weights_field`` (1.0 otherwise). :meth:`from_manifest` reads an
    export's ``manifest.csv`` instead (no FiftyOne needed).
    """

    def __init__(self, samples, label_field: str = "ground_truth", weights_field: str | None = None,
                 transform: Callable | None = None, classes: Sequence[str] | None = None,
                 include_generated: bool = True, exclude_tags: Sequence[str] | None = None,
                 image_size: int | Sequence[int] | None = None):
        validation.require_nonempty(samples)
        validation.require_fields(samples, [label_field] + ([weights_field] if weights_field else []))
        _require_weights(samples, weights_field)
        view = _training_view(samples, label_field, include_generated, exclude_tags)
        if not len(view):
            raise validation.FairBalanceError("No labelled sample in the view")
        has_gen = samples._root_dataset.has_field("generated")
        paths, labels = view.values(["filepath", label_path(samples, label_field)])
        generated = view.values("generated") if has_gen else [False] * len(paths)
        w = view.values(weights_field) if weights_field else [None] * len(paths)
        self._setup(paths, [str(v) for v in labels], w, [bool(g) for g in generated], transform, classes, image_size)

    @classmethod
    def from_manifest(cls, manifest: str, transform: Callable | None = None, classes: Sequence[str] | None = None,
                      image_size: int | Sequence[int] | None = None, exclude_tags: Sequence[str] | None = None):
        """The dataset of an export's ``manifest.csv`` (its ``filepath``, ``label``, ``weight`` and ``generated``
        columns), for a trainer on another machine: paths relative to the manifest's folder also work."""
        if not os.path.isfile(manifest):
            raise validation.FairBalanceError(f"no manifest file {manifest}")
        with open(manifest, newline="") as f:
            rows = list(csv.DictReader(f))
        missing = {"filepath", "label"} - set(rows[0] if rows else {})
        if not rows or missing:
            raise validation.FairBalanceError(f"{manifest} is not an export manifest (empty, or no {sorted(missing)})")
        drop = set(exclude_tags or ())
        rows = [r for r in rows if not drop.intersection(filter(None, (r.get("tags") or "").split(";")))]
        base = os.path.dirname(os.path.abspath(manifest))
        paths = [r["filepath"] if os.path.isabs(r["filepath"]) else os.path.join(base, r["filepath"]) for r in rows]
        self = cls.__new__(cls)
        self._setup(paths, [r["label"] for r in rows], [r.get("weight") or None for r in rows],
                    [r.get("generated") == "True" for r in rows], transform, classes, image_size)
        return self

    def _setup(self, paths, labels, weights, generated, transform, classes, image_size) -> None:
        from fairbalance.core import images

        self.classes = list(classes) if classes is not None else sorted(set(labels))
        unknown = sorted(set(labels) - set(self.classes))
        if unknown:
            raise validation.FairBalanceError(f"labels {unknown} are not in classes {self.classes}")
        index = {c: i for i, c in enumerate(self.classes)}
        self.filepaths = list(paths)
        self.targets = np.array([index[v] for v in labels], dtype=np.int64)
        self.weights = np.array([1.0 if v is None else float(v) for v in weights], dtype=np.float32)
        validation.require_image_files(self.filepaths)
        self._load = images.load_rgb
        self.transform = transform
        self.image_size = self._target_size(image_size, generated) if transform is None else None

    def _target_size(self, image_size, generated) -> tuple[int, int]:
        """``(width, height)`` every image is served at: the given size, or the real images' most common one."""
        if image_size is not None:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
                raise validation.FairBalanceError(f"image_size must be a positive int or (width, height), "
                                                  f"got {image_size!r}")
            return size
        sizes = [_image_size(p) for p in self.filepaths]
        real = [s for s, g in zip(sizes, generated) if not g] or sizes
        size = Counter(real).most_common(1)[0][0]
        other = Counter(s for s in sizes if s != size)
        if other:
            warnings.warn(f"{sum(other.values())} image(s) of other sizes {dict(other)} are resized to the real "
                          f"images' {size[0]}x{size[1]} (image_size= chooses the size)", stacklevel=3)
        return size

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, i: int):
        from PIL import Image

        img = self._load(self.filepaths[i])
        if self.transform is not None:
            x = self.transform(img)
        else:
            if img.size != self.image_size:
                img = img.resize(self.image_size, Image.BICUBIC)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return x, int(self.targets[i]), float(self.weights[i])
