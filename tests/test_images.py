"""Image loading: every mode to 8-bit RGB, unreadable files named, skipped only when asked."""

import numpy as np
import pytest
from PIL import Image

from fairbalance.core import images
from fairbalance.train import training
from fairbalance.core.validation import FairBalanceError


def _files(tmp_path):
    paths = []
    for i, (mode, value) in enumerate((("RGB", (200, 10, 10)), ("L", 128), ("RGBA", (0, 0, 255, 255)),
                                       ("I;16", 65535))):
        p = tmp_path / f"{i}.png"
        Image.new(mode, (6, 6), value).save(p)
        paths.append(str(p))
    return paths


def test_modes_become_rgb(tmp_path):
    paths = _files(tmp_path)
    out = training.load_images(paths, 6)
    assert out.shape == (4, 3, 6, 6)
    assert np.allclose(out[1, :, 0, 0].numpy(), 128 / 255, atol=1e-3)  # gray -> equal channels
    assert np.allclose(out[3].numpy(), 1.0)  # 16-bit white stays white


def test_missing_and_corrupt_files(tmp_path):
    paths = _files(tmp_path)
    missing = str(tmp_path / "gone.png")
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"not a png")
    transform = training.image_transform(6)
    with pytest.raises(FairBalanceError, match="not found: .*gone.png"):
        list(images.iter_batches(paths + [missing], transform, num_workers=0))
    with pytest.raises(FairBalanceError, match="could not be loaded: .*bad.png"):
        list(images.iter_batches(paths + [str(corrupt)], transform, num_workers=0))
    report = images.LoadReport()
    got = list(images.iter_batches(paths + [missing, str(corrupt)], transform, num_workers=0, skip_failures=True,
                                   report=report))
    assert [i for idx, _ in got for i in idx] == [0, 1, 2, 3]
    assert sorted(report.failures) == [4, 5] and "FileNotFoundError" in report.failures[4]
