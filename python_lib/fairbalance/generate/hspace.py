"""DDIM on a conditional diffusion model and its h-space (the UNet's mid-block output): the DDIM grid and
one-step predictions, deterministic inversion, the reverse pass with h injected by Slerp (DiffInject,
:mod:`fairbalance.generate.diffinject`)."""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from fairbalance.core import validation
from fairbalance.generate.diffusion_model import ConditionalDiffusionModel


class HSpaceHook:
    """A forward hook on ``unet.mid_block``: records its output h, or edits it while ``edit`` is set.

    ``edit(h) -> h`` receives the mid block's output for the whole batch and
    returns the tensor the up path continues from.
    """

    def __init__(self, unet):
        if getattr(unet, "mid_block", None) is None:
            raise validation.FairBalanceError(
                "DiffInject edits the UNet's mid-block output (h-space), and this model has no mid block "
                "(mid_block_type=None); train one with a mid block (train_conditional_diffusion builds one)")
        self.edit = None
        self.last: torch.Tensor | None = None
        self._handle = unet.mid_block.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        out = output if self.edit is None else self.edit(output)
        self.last = out
        return out

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class DDIMPath:
    """The model's DDIM grid (``num_inference_steps`` timesteps, descending) and one-step predictions.

    The model is evaluated with a given condition, by default its null
    condition (unconditional).
    """

    def __init__(self, diff: ConditionalDiffusionModel, num_inference_steps: int):
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_pretrained(os.path.join(diff.folder, "scheduler"))
        validation.require_positive_int("num_inference_steps", num_inference_steps)
        if num_inference_steps > sched.config.num_train_timesteps:
            raise validation.FairBalanceError(
                f"num_inference_steps={num_inference_steps} exceeds the model's {sched.config.num_train_timesteps} "
                "training timesteps")
        sched.set_timesteps(num_inference_steps)
        self.timesteps = [int(t) for t in sched.timesteps]
        self.alphas = sched.alphas_cumprod.double()
        self.prediction_type = sched.config.prediction_type
        self.num_train_timesteps = int(sched.config.num_train_timesteps)
        self.net = diff.model
        self.device = next(self.net.parameters()).device

    def alpha(self, t: int) -> float:
        return float(self.alphas[t]) if t >= 0 else 1.0

    def null(self, n: int) -> torch.Tensor:
        return self.net.condition.null(n, self.device)

    def predict(self, x: torch.Tensor, t: int, a_t: float, labels: torch.Tensor):
        """``(eps, x0)`` predicted at ``x`` (noise level ``a_t``, timestep label ``t``)."""
        out = self.net(x, torch.tensor(t, device=self.device), labels).float()
        if self.prediction_type == "v_prediction":
            return math.sqrt(a_t) * out + math.sqrt(1 - a_t) * x, math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out
        if self.prediction_type == "epsilon":
            return out, (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
        raise validation.FairBalanceError(f"prediction_type {self.prediction_type!r} is not supported")


@torch.inference_mode()
def ddim_invert(path: DDIMPath, x0: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion of images in [-1, 1] to x_T over the same grid as the reverse pass.

    Each step goes from the noise level of ``t_k`` to that of ``t_{k+1}``
    with the noise predicted at ``(x_{t_k}, t_k)`` (the first from the clean
    image, predicted at the lowest timestep): the exact inverse of
    :func:`ddim_reverse` up to that one-step approximation.
    """
    # Not diffusers' DDIMInverseScheduler (issue 23): it evaluates the UNet at each step's *target* timestep, not
    # at the level the sample is at, and with the settings it reads from our scheduler folder (clip_sample=True,
    # set_alpha_to_one=True) it reconstructs ten times worse at 50 steps; configured at its best it is within 0.3%
    # of this loop but still slightly worse (tests/test_diffinject.py compares the two).
    x = x0.to(path.device).float()
    labels = path.null(len(x)) if labels is None else labels
    grid = path.timesteps[::-1]
    a_cur = 1.0
    for k, t in enumerate(grid):
        eps, x0_hat = path.predict(x, grid[max(0, k - 1)], a_cur if k else path.alpha(t), labels)
        a_next = path.alpha(t)
        x = math.sqrt(a_next) * x0_hat + math.sqrt(1 - a_next) * eps
        a_cur = a_next
    return x


def slerp_h(h_orig: torch.Tensor, h_content: torch.Tensor, gamma: float, mask: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Eq. 8 per image: ``Slerp(h_orig, h_content / ||h_content|| * ||h_orig||, gamma)``.

    With ``mask`` (1 x 1 x h x w, values in [0, 1]) both are masked first and
    the result is put back into ``h_orig`` outside the mask (local injection).
    ``gamma = 0`` returns ``h_orig``.
    """
    m = torch.ones_like(h_orig[:1, :1]) if mask is None else mask.to(h_orig)
    a, b = (h_orig * m).flatten(1).double(), (h_content * m).flatten(1).double()
    na = a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12) * na
    cos = ((a * b).sum(1, keepdim=True) / (na * na).clamp_min(1e-24)).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    parallel = sin < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1 - gamma), torch.sin((1 - gamma) * theta) / safe)
    wb = torch.where(parallel, torch.full_like(sin, gamma), torch.sin(gamma * theta) / safe)
    mixed = (wa * a + wb * b).view_as(h_orig).to(h_orig.dtype)
    return mixed + h_orig * (1 - m)


@torch.inference_mode()
def content_trajectory(path: DDIMPath, hook: HSpaceHook, x_t: torch.Tensor, t_edit: int,
                       labels: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The h of a content's own deterministic reverse pass from x_T, at every step with t >= ``t_edit``."""
    labels = path.null(len(x_t)) if labels is None else labels
    x, hs = x_t.to(path.device), []
    hook.edit = None
    for i, t in enumerate(path.timesteps):
        if t < t_edit:
            break
        a_t, a_prev = path.alpha(t), path.alpha(path.timesteps[i + 1] if i + 1 < len(path.timesteps) else -1)
        eps, x0 = path.predict(x, t, a_t, labels)
        hs.append(hook.last)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return hs


@torch.inference_mode()
def ddim_reverse(path: DDIMPath, hook: HSpaceHook, x_t: torch.Tensor, labels: torch.Tensor | None = None,
                 content_h: Sequence[torch.Tensor] | None = None, gamma: float = 0.0,
                 mask: torch.Tensor | None = None, t_edit: int | None = None, t_boost: int = 0,
                 seeds: Sequence[int] | None = None) -> torch.Tensor:
    """The reverse pass from x_T to images in [-1, 1], optionally with content injection.

    Without ``content_h`` a plain deterministic DDIM pass (the
    reconstruction of an inverted image) except that steps with ``t <=
    t_boost`` add noise (eta = 1; ``seeds``: one per image). With
    ``content_h`` (from :func:`content_trajectory`, one tensor per step with
    t >= ``t_edit``), those steps replace h by :func:`slerp_h` and take the
    asymmetric step: x0 predicted with the edited h, the direction term
    with the original h.
    """
    labels = path.null(len(x_t)) if labels is None else labels
    x = x_t.to(path.device).float()
    n = len(x)
    gens = [torch.Generator().manual_seed(int(s)) for s in (seeds if seeds is not None else range(n))]
    steps = path.timesteps
    for i, t in enumerate(steps):
        a_t, a_prev = path.alpha(t), path.alpha(steps[i + 1] if i + 1 < len(steps) else -1)
        if content_h is not None and t >= t_edit and i < len(content_h):
            h_c = content_h[i]
            hook.edit = lambda h, h_c=h_c: torch.cat([slerp_h(h[n:], h_c, gamma, mask), h[n:]])
            try:
                eps, x0 = path.predict(torch.cat([x, x]), t, a_t, torch.cat([labels, labels]))
            finally:
                hook.edit = None
            x0_edit, eps_orig = x0[:n], eps[n:]
            x0 = x0_edit
            eps = eps_orig
        else:
            eps, x0 = path.predict(x, t, a_t, labels)
        sigma = 0.0
        if t <= t_boost and a_prev < 1.0:
            sigma = math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(max(0.0, 1 - a_t / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1 - a_prev - sigma ** 2)) * eps
        if sigma > 0:
            z = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)
            x = x + sigma * z
    return x


def h_shape(path: DDIMPath, hook: HSpaceHook) -> tuple[int, int]:
    """The spatial size of h (the mid block's output), from one forward pass."""
    size = path.net.unet.config.sample_size
    with torch.inference_mode():
        path.predict(torch.zeros(1, 3, size, size, device=path.device), path.timesteps[0], 0.5, path.null(1))
    return tuple(hook.last.shape[-2:])
