"""Sampling a conditional diffusion model: DDIM or DDPM with compositional classifier-free guidance, from noise
or from a real image noised part of the way (an edit), optionally reached by DDIM inversion."""

from __future__ import annotations

import os

import numpy as np
import torch

from fairbalance.core import validation
from fairbalance.generate.diffusion_model import ConditionalDiffusionModel

SCHEDULERS = ("ddim", "ddpm")
TONE_MATCHES = ("histogram", "source")  # match_tone: what an edit keeps of its source's brightness


def validate_sampling(guidance_scale: float, num_inference_steps: int, scheduler: str,
                      attribute_guidance_scale: float | None = None, edit_strength: float | None = None) -> None:
    """Every sampling parameter finite and in range, the sampler known; before anything is written."""
    for name, value in (("guidance_scale", guidance_scale), ("attribute_guidance_scale", attribute_guidance_scale)):
        if value is not None and not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
            raise validation.FairBalanceError(f"{name} must be a finite number >= 0, got {value!r}")
    validation.require_positive_int("num_inference_steps", num_inference_steps)
    if scheduler not in SCHEDULERS:
        raise validation.FairBalanceError(f"scheduler must be one of {SCHEDULERS}, not {scheduler!r}")
    if edit_strength is not None and not (isinstance(edit_strength, (int, float)) and 0 < edit_strength <= 1):
        raise validation.FairBalanceError(f"edit_strength must be in (0, 1], got {edit_strength!r}")


@torch.inference_mode()
def sample_images(model: ConditionalDiffusionModel, labels, seeds: list[int], guidance_scale: float = 3.0,
                  num_inference_steps: int = 50, scheduler: str = "ddim", attribute_guidance_scale: float | None = None,
                  init_images: torch.Tensor | None = None, edit_strength: float | None = None,
                  reference_labels=None, inversion: bool = False, keep_background: bool = False,
                  inversion_labels=None, match_tone: str | None = None) -> np.ndarray:
    """One image per (condition, seed) with classifier-free guidance; uint8 N x H x W x 3.

    ``labels``: class indices, or (class, attribute) pairs for a factorised
    model. Guidance is compositional: ``u + s_c (e(c) - u) + s_a (e(c, a) - e(c))``
    with ``s_c = guidance_scale`` and ``s_a = attribute_guidance_scale``
    (default: the same), which is plain CFG when they are equal.
    ``init_images`` (N x 3 x H x W in [-1, 1]) with ``edit_strength`` in (0, 1]:
    noise those images to that fraction of the schedule and denoise them
    under the condition (an edit of a real image; 1.0 = from pure noise).
    ``reference_labels`` (the source images' own (class, attribute)): guide
    by contrast instead, ``e(ref) + s_a (e(c, a) - e(ref))``, which moves
    the attribute from the source's value to the asked one while the class
    terms cancel (the class embedding also carries its usual attribute, so
    class guidance pulls toward it); ``guidance_scale`` is then unused.

    Edits that keep what must not change (content-preserving editing):
    ``inversion=True`` reaches the start noise by DDIM inversion of the
    init image under its own condition (``inversion_labels``, else
    ``reference_labels``, else ``labels``) instead of random noise, so denoising under the image's own
    condition gives the image back and under another condition changes what
    differs (Song et al. 2021; Mokady et al. 2023); ``keep_background=True``
    copies back the init image's background pixels (those within 0.2 of its
    border's median colour), so the haze of an under-trained model never
    reaches the background.

    ``match_tone`` (edits; for attributes carried by hue and saturation,
    such as colour) gives the result its source's brightness, so strokes
    are neither heavier nor lighter than real ones: ``"histogram"`` maps
    each image's value (max over channels) onto the source's value
    distribution by rank (per-image histogram matching; the generated
    image's own layout is kept), ``"source"`` takes the source's value
    pixel by pixel (only hue and saturation come from the generator: a
    recolouring). Hue and saturation of every pixel are kept; see
    :func:`match_value`.
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    validate_sampling(guidance_scale, num_inference_steps, scheduler, attribute_guidance_scale, edit_strength)
    folder = os.path.join(model.folder, "scheduler")
    sched = (DDIMScheduler if scheduler == "ddim" else DDPMScheduler).from_pretrained(folder)
    sched.set_timesteps(num_inference_steps)
    net = model.model
    dev = next(net.parameters()).device
    size = model.unet.config.sample_size
    cond = torch.as_tensor(np.asarray(labels), device=dev).long()
    cond = cond[:, None] if cond.ndim == 1 else cond
    nfactors = len(net.condition.factor_sizes)
    if cond.shape[1] != nfactors:
        raise validation.FairBalanceError(f"the model takes {nfactors} condition value(s) per image, not {cond.shape[1]}")
    x = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(dev)
    timesteps = sched.timesteps
    ref = None if reference_labels is None else torch.as_tensor(np.asarray(reference_labels), device=dev).long()
    if match_tone is not None and match_tone not in TONE_MATCHES:
        raise validation.FairBalanceError(f"match_tone must be None or one of {TONE_MATCHES}, not {match_tone!r}")
    if (inversion or keep_background or match_tone) and init_images is None:
        raise validation.FairBalanceError("inversion, keep_background and match_tone edit an image: pass init_images")
    if init_images is not None:
        start = min(len(timesteps) - 1, int(round(len(timesteps) * (1 - (edit_strength or 1.0)))))
        timesteps = timesteps[start:]
        if inversion:
            own = cond if ref is None else ref.view_as(cond)
            if inversion_labels is not None:
                own = torch.as_tensor(np.asarray(inversion_labels), device=dev).long().view_as(cond)
            x = _ddim_invert(net, sched, init_images.to(dev), timesteps, own)
        else:
            x = sched.add_noise(init_images.to(dev), x, timesteps[:1].repeat(len(x)))
    null = net.condition.null(len(x), dev)
    partial = cond.clone()
    if nfactors > 1:
        partial[:, 1:] = null[:, 1:]  # class only
    s_c = guidance_scale
    s_a = guidance_scale if attribute_guidance_scale is None else attribute_guidance_scale
    step_gens = [torch.Generator().manual_seed(s + 1) for s in seeds]  # per-image noise: batch-independent
    for t in timesteps:
        if ref is not None:
            full, base = net(torch.cat([x, x]), t, torch.cat([cond, ref.view_as(cond)])).chunk(2)
            pred = base + s_a * (full - base)
        elif nfactors > 1:
            variants = [cond, null, partial]
            full, uncond, cls = net(torch.cat([x] * 3), t, torch.cat(variants)).chunk(3)
            pred = uncond + s_c * (cls - uncond) + s_a * (full - cls)
        else:
            full, uncond = net(torch.cat([x, x]), t, torch.cat([cond, null])).chunk(2)
            pred = uncond + s_c * (full - uncond)
        if scheduler == "ddim":
            x = sched.step(pred, t, x, eta=0.0).prev_sample
        else:
            x = sched.step(pred, t, x, generator=step_gens).prev_sample
    if match_tone:
        x = match_value(x.clamp(-1, 1), init_images.to(dev), match_tone)
    if keep_background:
        src = init_images.to(dev)
        keep = background_mask(src)
        x = torch.where(keep, src, x)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def match_value(images: torch.Tensor, sources: torch.Tensor, how: str = "histogram") -> torch.Tensor:
    """``images`` (N x 3 x H x W in [-1, 1]) with the value (max over channels) of ``sources``, hue and saturation kept.

    ``"histogram"``: each image's values replaced by the source's values of the same rank (per-image histogram
    matching); ``"source"``: the source's value at each pixel. A pixel too dark to carry a hue (value < 0.05)
    takes its image's value-weighted mean chroma.
    """
    g, s = (images + 1) / 2, (sources + 1) / 2
    vg, vs = g.amax(dim=1), s.amax(dim=1)  # N x H x W
    n = len(g)
    if how == "source":
        target = vs
    else:
        order = vg.reshape(n, -1).argsort(dim=1)
        target = torch.empty_like(vg.reshape(n, -1))
        target.scatter_(1, order, vs.reshape(n, -1).sort(dim=1).values)
        target = target.view_as(vg)
    lit = (vg >= 0.05)[:, None]
    chroma = g / vg[:, None].clamp_min(0.05)  # max channel 1 where lit
    weights = (vg[:, None] * lit).sum(dim=(2, 3)).clamp_min(1e-6)
    mean_chroma = (chroma * vg[:, None] * lit).sum(dim=(2, 3)) / weights  # N x 3
    mean_chroma = mean_chroma / mean_chroma.amax(dim=1, keepdim=True).clamp_min(1e-6)
    mean_chroma = torch.where(lit.flatten(1).any(1, keepdim=True), mean_chroma, torch.ones_like(mean_chroma))
    chroma = torch.where(lit, chroma, mean_chroma[:, :, None, None])
    return (chroma * target[:, None]).clamp(0, 1) * 2 - 1


def background_mask(images: torch.Tensor, tolerance: float = 0.4) -> torch.Tensor:
    """N x 1 x H x W: pixels within ``tolerance`` (images in [-1, 1]; 0.2 in [0, 1]) of the border's median colour."""
    n, _, h, w = images.shape
    r = max(1, min(h, w) // 16)
    ring = torch.ones(h, w, dtype=torch.bool, device=images.device)
    ring[r:h - r, r:w - r] = False
    bg = images[:, :, ring].median(dim=2).values[:, :, None, None]
    return ((images - bg).abs().amax(dim=1, keepdim=True) <= tolerance)


def _ddim_invert(net, sched, x0: torch.Tensor, timesteps, labels: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM inversion of clean images up to ``timesteps[0]`` under ``labels`` (no guidance).

    Walks the sampler's own timesteps backwards (from the least noisy);
    each step predicts the clean image and the noise at the current noise
    level and moves both to the next, the reverse of an eta = 0 DDIM step.
    """
    alphas = sched.alphas_cumprod.to(x0.device)
    kind = sched.config.prediction_type
    x = x0
    levels = list(reversed([int(t) for t in timesteps]))
    current = None  # the clean image: alpha_bar = 1
    for t in levels:
        a_t = alphas[t]
        if current is None:  # from the clean image, the noise is estimated at the first level
            xs = torch.sqrt(a_t) * x  # the clean image seen at that level, without noise
            out = net(xs, torch.tensor(t, device=x.device), labels)
            eps = (torch.sqrt(1 - a_t) * xs + torch.sqrt(a_t) * out) if kind == "v_prediction" else out
            x0_hat = x
        else:
            a_s = alphas[current]
            out = net(x, torch.tensor(current, device=x.device), labels)
            if kind == "v_prediction":
                x0_hat = torch.sqrt(a_s) * x - torch.sqrt(1 - a_s) * out
                eps = torch.sqrt(1 - a_s) * x + torch.sqrt(a_s) * out
            else:
                eps = out
                x0_hat = (x - torch.sqrt(1 - a_s) * eps) / torch.sqrt(a_s)
        x = torch.sqrt(a_t) * x0_hat + torch.sqrt(1 - a_t) * eps
        current = t
    return x
