"""Training under ``accelerate launch`` / ``torchrun``: every process trains its share, the main one writes.

The public training functions (:func:`fairbalance.train_conditional_diffusion`,
:func:`fairbalance.train_classifier`, :func:`fairbalance.finetune_per_group`)
run unchanged in a script started by a launcher with N processes: each
process reads the same samples from FiftyOne (read only), builds the same
model from the same seed and trains on its slice of every global batch; the
gradients are averaged (DDP for the diffusion model, one all-reduce per step
elsewhere), so all processes hold the same weights. Only the main process
(rank 0) writes: claims, run records, model folders and checkpoints; the
others wait for it (:func:`on_main`) and raise its error when it fails, so
no process is left waiting. ``batch_size`` stays the global batch: N
processes take the same optimisation steps as one process would, and a
checkpoint resumes with any number of processes.

Without a launcher (``WORLD_SIZE`` unset or 1) every helper is a no-op and
nothing initialises ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fairbalance.core import models, validation


def launched() -> bool:
    """Whether this process is one of several started by a launcher (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.distributed.is_available()


def setup(device=None):
    """accelerate's process state (the process group, this rank's device); None without a launcher.

    ``device="cpu"``, or no GPU, keeps every process on the CPU (the gloo
    backend); otherwise each process takes its own GPU (``LOCAL_RANK``).
    """
    validation.require_device(device)
    if not launched():
        return None
    from accelerate import PartialState

    # without cpu=True accelerate expects GPUs under torchrun and would start N single processes instead
    cpu = (device is not None and torch.device(device).type == "cpu") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def rank() -> int:
    return setup().process_index if launched() else 0


def world_size() -> int:
    return setup().num_processes if launched() else 1


def is_main() -> bool:
    return rank() == 0


def device(requested=None) -> torch.device:
    """The device this process trains on: ``requested`` (or the best) alone, this rank's under a launcher."""
    return setup(requested).device if launched() else models.resolve_device(requested)


def progress_for(progress):
    """Progress reported by the main process only (N bars for one job would only confuse)."""
    return progress if is_main() else False


def barrier() -> None:
    if launched():
        setup().wait_for_everyone()


def on_main(fn, *args, share: bool = False, **kwargs):
    """``fn(*args, **kwargs)`` on the main process only; the others wait until it has finished.

    An exception there is raised on every process (the same class when it
    can be rebuilt from its message, else :class:`FairBalanceError`), so a
    refused claim or a failed write stops the whole job instead of leaving
    the other processes waiting. With ``share`` the other processes get the
    (picklable) return value; otherwise None.
    """
    if not launched():
        return fn(*args, **kwargs)
    from accelerate.utils import broadcast_object_list

    main = is_main()
    result = error = None
    if main:
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # every process must hear of it, then it is raised here unchanged
            error = e
    payload = [None if error is None else (type(error), str(error)), result if share and main else None]
    broadcast_object_list(payload, from_process=0)
    if error is not None:
        raise error
    if payload[0] is not None:
        cls, message = payload[0]
        message = f"{message} (raised on the main process)"
        try:
            raised = cls(message)
        except Exception:
            raised = validation.FairBalanceError(f"{cls.__name__}: {message}")
        raise raised
    return result if main else payload[1]


@dataclass
class Shard:
    """This process's rows of a global batch of ``total`` rows (contiguous, in rank order)."""

    part: slice
    total: int

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """This process's share of the global batch mean (the shares add up to it)."""
        return values.sum() / max(1, self.total)


def shard(total: int) -> Shard:
    """Split ``total`` rows over the processes like ``numpy.array_split`` (all of them without a launcher)."""
    n, r = world_size(), rank()
    return Shard(slice(r * total // n, (r + 1) * total // n), total)


def sum_gradients(parameters) -> None:
    """Add up the gradients of ``parameters`` over the processes (one all-reduce of one flat buffer).

    With losses written as each process's share of the global mean
    (:meth:`Shard.mean`), the sum is the gradient of the global batch: the
    same step one process would take on the whole batch.
    """
    if not launched():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_values(*values: float) -> list[float]:
    """Per-process figures (loss sums, counts) added up over the processes, for metrics."""
    if not launched():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=setup().device)
    torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def gather_rows(t: torch.Tensor, total: int, differentiable: bool = False) -> torch.Tensor:
    """Every process's rows of a global batch of ``total`` rows, in rank order (``t``: this process's).

    ``differentiable``: gradients flow back to each process's own rows (for
    losses that compare samples across the batch, such as SupCon).
    """
    if not launched():
        return t
    n = world_size()
    sizes = [(r + 1) * total // n - r * total // n for r in range(n)]
    width = max(sizes)
    padded = torch.cat([t, t.new_zeros((width - len(t),) + tuple(t.shape[1:]))]) if len(t) < width else t
    if differentiable:
        import torch.distributed.nn.functional as dist_fn

        parts = dist_fn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(n)]
        torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])
