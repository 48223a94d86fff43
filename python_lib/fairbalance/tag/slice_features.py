"""What slice discovery clusters: a classifier's layers and model-agnostic image statistics.

The penultimate layer of a biased classifier separates what the model uses
to decide; low-level attributes it does not use (blur, pixel noise, stroke
thickness, tint) live in earlier layers and in the pixels themselves
(Cleanlab/CleanVision's image properties: brightness, blur, noise). These
are the feature sources of :func:`fairbalance.discover_slices`:

- ``"model"``: the penultimate layer (or the stored ``features_field``);
- ``"early"``: the classifier's first hidden layer (the output of its
  first ReLU; global average pooled when it is a feature map);
- ``"pixels"``: :func:`image_statistics`, a fixed vector per image.

Each source is reduced and scaled to the same total variance before they
are joined, so no source outweighs another by its width.
"""

from __future__ import annotations

import numpy as np

SOURCES = ("model", "early", "pixels")
HIST_BINS = 8


def image_statistics(batch) -> np.ndarray:
    """Per-image statistics of a batch (B x 3 x H x W, values in [0, 1]): what a person would call brightness,
    contrast, colour, sharpness, noise and orientation, with no model.

    Per channel mean and standard deviation; an 8-bin histogram of the grey
    intensity; colourfulness (mean |R - G| and |(R + G)/2 - B|, Hasler and
    Suesstrunk); gradient energy along x and y; high-frequency energy (mean
    |Laplacian|) and its ratio to the gradient energy (low when blurred, high
    when noisy); the intensity-weighted spread along x and y and their
    covariance (the orientation of the content).
    """
    import torch

    x = batch.float()
    b, _, h, w = x.shape
    flat = x.reshape(b, 3, -1)
    grey = x.mean(1)
    hist = torch.stack([((grey >= lo) & (grey < lo + 1 / HIST_BINS)).float().mean((1, 2))
                        for lo in np.arange(HIST_BINS - 1) / HIST_BINS]
                       + [(grey >= (HIST_BINS - 1) / HIST_BINS).float().mean((1, 2))], 1)
    r, g, bl = x[:, 0], x[:, 1], x[:, 2]
    colour = torch.stack([(r - g).abs().mean((1, 2)), ((r + g) / 2 - bl).abs().mean((1, 2))], 1)
    dx = (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean((1, 2))
    dy = (grey[:, 1:, :] - grey[:, :-1, :]).abs().mean((1, 2))
    lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2]
           - grey[:, 1:-1, 2:]).abs().mean((1, 2))
    sharp = torch.stack([dx, dy, lap, lap / (dx + dy + 1e-6)], 1)
    # the content's spread: moments of the intensity above the image's own median (the background)
    mass = (grey - grey.reshape(b, -1).median(1).values[:, None, None]).clamp(min=0)
    mass = mass / mass.sum((1, 2), keepdim=True).clamp(min=1e-6)
    ys = torch.linspace(-1, 1, h)[None, :, None]
    xs = torch.linspace(-1, 1, w)[None, None, :]
    mx, my = (mass * xs).sum((1, 2)), (mass * ys).sum((1, 2))
    cx, cy = xs - mx[:, None, None], ys - my[:, None, None]
    shape = torch.stack([(mass * cx ** 2).sum((1, 2)), (mass * cy ** 2).sum((1, 2)), (mass * cx * cy).sum((1, 2))], 1)
    return torch.cat([flat.mean(2), flat.std(2), hist, colour, sharp, shape], 1).cpu().numpy()


def _first_relu(encoder):
    """The encoder's first ReLU module (where the earliest hidden features are), or None."""
    import torch.nn as nn

    return next((m for m in encoder.modules() if isinstance(m, nn.ReLU)), None)


def _pool(o):
    """A layer's output as one vector per image: feature maps average-pooled over space."""
    o = o.detach().float()
    return o.mean((2, 3)) if o.dim() == 4 else o.flatten(1)


def model_outputs(clf, paths, device=None, batch_size: int = 256, num_workers: int = 0, sources=("model",)):
    """``(penultimate features, logits, {source: matrix})`` of ``clf`` for image files (eval mode), with the
    extra sources asked for (``"early"``, ``"pixels"``) computed in the same pass over the images."""
    import torch

    from fairbalance.core import images, models
    from fairbalance.core.data import image_transform
    from fairbalance.train import training

    dev = models.resolve_device(device)
    encoder, head = training.split_encoder_head(clf.model.to(dev).eval())
    caught = {}
    relu = _first_relu(encoder) if "early" in sources else None
    # pooled in the hook: no feature map kept, and a later in-place op cannot change what was caught
    hook = None
    if relu is not None:
        hook = relu.register_forward_hook(lambda m, i, o: caught.__setitem__("early", _pool(o)))
    feats, logits, extra = [], [], {s: [] for s in sources if s != "model"}
    order = []
    try:
        with torch.inference_mode():
            for idx, batch in images.iter_batches(paths, image_transform(clf.config.image_size), batch_size,
                                                  num_workers):
                f = encoder(batch.to(dev)).float()
                feats.append(f.cpu().numpy())
                logits.append(head(f).float().cpu().numpy())
                order.append(np.asarray(idx))
                if "early" in extra:
                    extra["early"].append(caught["early"].cpu().numpy())
                if "pixels" in extra:
                    extra["pixels"].append(image_statistics(batch))
    finally:
        if hook is not None:
            hook.remove()
    inverse = np.argsort(np.concatenate(order), kind="stable")

    def stack(parts):
        return np.concatenate(parts)[inverse].astype(np.float32)

    return stack(feats), stack(logits), {s: stack(v) for s, v in extra.items() if v}


def standardise(x: np.ndarray) -> np.ndarray:
    """Columns to zero mean and unit variance (constant columns to zero)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(0)
    return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0)
