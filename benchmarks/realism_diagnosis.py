"""What a discriminator uses to tell generated images from a cell-matched real reference (``bench_realism.py --diagnose``).

Two views of the same comparison (generated images vs the reference weighted to their digit x cluster mix, as
``measure_realism(reference_samples=..., match_cells=True)``):

- the two-sample test (same MLP, folds, epochs) on images reduced to one kind of cue: ``value only`` (each
  pixel's max over R, G, B, grey: stroke shape, thickness and brightness, no colour); ``chroma only`` (each
  stroke pixel's colour at full value on a black background: hue, saturation and their spread along the
  stroke, the stroke's outline but not its brightness profile);
- single hand features per image (stroke = value > 0.2): stroke value (mean), stroke fraction, saturation
  (mean), colour spread (std of the unit-value chroma across stroke pixels, mean over channels), edge energy
  (mean |Laplacian| of the value), soft-edge fraction (stroke-neighbourhood pixels with value in 0.05-0.5), and
  each one's weighted ROC AUC (reference = positive; 0.5 = no signal; reported as max(AUC, 1 - AUC)).

Measurement only: the reference's cells come from ``bench_repair.cell_reference`` (true colours, read here only).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance.core.data import load_images, native_size
from fairbalance.generate import realism, realism_reference

FEATURES = ("stroke value", "stroke fraction", "saturation", "colour spread", "edge energy", "soft edge")


def _value_chroma(x: torch.Tensor):
    v = x.amax(dim=1)  # N x H x W
    mask = v > 0.2
    chroma = x / v[:, None].clamp_min(1e-3)
    return v, mask, chroma


def hand_features(x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per image (N x 3 x H x W in [0, 1]) the features of ``FEATURES``."""
    v, mask, chroma = _value_chroma(x)
    m = mask.float()
    n = m.sum(dim=(1, 2)).clamp_min(1)
    sat = (x.amax(1) - x.amin(1)) / v.clamp_min(1e-3)
    mean_c = (chroma * m[:, None]).sum(dim=(2, 3)) / n[:, None]
    spread = (((chroma - mean_c[:, :, None, None]) ** 2 * m[:, None]).sum(dim=(2, 3)) / n[:, None]).sqrt().mean(1)
    lap = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]])[None, None]
    edge = F.conv2d(v[:, None], lap, padding=1).abs().mean(dim=(1, 2, 3))
    near = F.max_pool2d(m[:, None], 3, 1, 1)[:, 0] > 0
    soft = ((v > 0.05) & (v <= 0.5) & near).float().sum(dim=(1, 2)) / near.float().sum(dim=(1, 2)).clamp_min(1)
    return {"stroke value": ((v * m).sum(dim=(1, 2)) / n).numpy(), "stroke fraction": m.mean(dim=(1, 2)).numpy(),
            "saturation": ((sat * m).sum(dim=(1, 2)) / n).numpy(), "colour spread": spread.numpy(),
            "edge energy": edge.numpy(), "soft edge": soft.numpy()}


def value_only(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=1, keepdim=True).expand(-1, 3, -1, -1).contiguous()


def chroma_only(x: torch.Tensor) -> torch.Tensor:
    _, mask, chroma = _value_chroma(x)
    return (chroma.clamp(0, 1) * mask[:, None]).contiguous()


def _auc(pos: np.ndarray, neg: np.ndarray, w_pos: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    w = np.r_[w_pos / w_pos.sum(), np.ones(len(neg)) / len(neg)]
    a = roc_auc_score(y, np.r_[pos, neg], sample_weight=w)
    return max(a, 1 - a)


def diagnose(gen_view, ref_view, attr: str = "sa_cluster", seed: int = 1) -> dict:
    """Two-sample accuracies on the reduced images and the hand features' means and AUCs (see the module)."""
    gp, gl, ga = gen_view.values(["filepath", "ground_truth.label", f"{attr}.label"])
    rp, rl, ra = ref_view.values(["filepath", "ground_truth.label", f"{attr}.label"])
    w, keep, _, _ = realism_reference.cell_weights(list(zip(rl, ra)), list(zip(gl, ga)))
    use = w > 0
    xr = load_images([p for p, u in zip(rp, use) if u], native_size(gp[:1]), progress=False)
    xg = load_images([p for p, k in zip(gp, keep) if k], native_size(gp[:1]), progress=False)
    w = w[use]
    out = {}
    for name, fn in (("full", lambda t: t), ("value only", value_only), ("chroma only", chroma_only)):
        pr, pg = realism.discriminator_scores(fn(xr), fn(xg), folds=5, epochs=10, seed=seed, real_weights=w)
        out[name] = realism.two_sample_accuracy(pr, pg, real_weights=w)
    fr, fg = hand_features(xr), hand_features(xg)
    out["features"] = {k: (float(np.average(fr[k], weights=w)), float(fg[k].mean()), _auc(fr[k], fg[k], w))
                       for k in FEATURES}
    return out


def report(d: dict) -> str:
    feats = "; ".join(f"{k} {r:.3f} / {g:.3f} (AUC {a:.2f})" for k, (r, g, a) in d["features"].items())
    return (f"two-sample acc. full / value only / chroma only: {d['full']:.3f} / {d['value only']:.3f} / "
            f"{d['chroma only']:.3f}; reference / generated: {feats}")


def save_edit_grid(gen_view, path: str, n: int = 12, scale: int = 3) -> str:
    """Sources (top row) and their edits (bottom row) of the first ``n`` generated images, as one PNG."""
    import os

    from PIL import Image

    from fairbalance.core import images

    gen = gen_view.sort_by("filepath").limit(n)
    rows = [gen.values("generation.source_filepath"), gen.values("filepath")]
    size = 28 * scale
    grid = Image.new("RGB", (len(rows[1]) * (size + 2), 2 * (size + 2)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, p in enumerate(row):
            grid.paste(images.load_rgb(p).resize((size, size), Image.NEAREST), (c * (size + 2), r * (size + 2)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return path
