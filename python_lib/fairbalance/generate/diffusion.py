"""Conditional diffusion models: training on pseudo-labels (x an attribute); the model and its loader are in
:mod:`fairbalance.generate.diffusion_model`, sampling in :mod:`fairbalance.generate.diffusion_sampling`
(their names are importable from here too).

Training (Suayama & Nakamura, III-D): a diffusers ``UNet2DModel`` whose class
embedding is a :class:`FactorisedCondition`: one table per factor (the
cluster, or the class and an attribute such as the cluster), each with a
"null" row for classifier-free guidance (each factor dropped to it with
probability ``cond_drop_prob``); the DDPM cosine noise schedule with
v-prediction (with epsilon-prediction the few training steps a CPU affords
left global colour to the initial noise instead of the class), EMA weights,
AMP on GPU, and periodic checkpoints that a rerun resumes from (exactly: the
batch order depends on the seed and epoch, the noise on the seed and step).
``accelerate`` runs the loop, so the same call works under ``accelerate
launch`` / ``torchrun`` with N processes (:mod:`fairbalance.core.distributed`):
each takes its slice of every global batch of ``batch_size``, the main
process alone writes checkpoints, the model and the run.

Sampling (:mod:`fairbalance.generate.diffusion_sampling`): DDIM or DDPM with
compositional classifier-free guidance, from noise or from a real image noised
part of the way (an edit). What to generate and how it joins the dataset is
:mod:`fairbalance.generate.engine` (the shared loop) and :mod:`fairbalance.generate.generation`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance.core import distributed, folders, runs, validation
from fairbalance.core.data import labelled_samples, load_images, native_size, seed_everything
from fairbalance.generate.diffusion_model import (  # noqa: F401  (also diffusion.<name>: the model and its loader)
    CONDITION_FILE, LABELS_FILE, ConditionalDiffusionModel, ConditionalUNet, DiffusionTrainConfig, FactorisedCondition,
    load_conditional_diffusion)
from fairbalance.generate.diffusion_model import build_model as _build_model
from fairbalance.generate.diffusion_model import save_model as _save_model
from fairbalance.generate.diffusion_sampling import (  # noqa: F401  (also diffusion.<name>: sampling)
    SCHEDULERS, background_mask, sample_images, validate_sampling)

RESUME_IGNORES = ("epochs",)  # a rerun with more epochs resumes the same run
STATE_DIR = "training_state"
LATEST_FILE = "latest.json"  # in STATE_DIR: the step and folder of the last complete checkpoint
# what training writes in its folder (listed there before it is written, so overwrite deletes these and nothing else)
MODEL_ENTRIES = ("unet", "scheduler", CONDITION_FILE, CONDITION_FILE + ".tmp", LABELS_FILE, LABELS_FILE + ".tmp",
                 STATE_DIR)
MIN_IMAGES_PER_CLUSTER = 10
LOSS_WEIGHTINGS = ("none", "p2")
# Config keys added after models were first saved, with the value those models were trained with.
ADDED_CONFIG_DEFAULTS = {"loss_weighting": "none", "p2_gamma": 1.0, "p2_k": 1.0}


def _factor_labels(samples, label_field, attribute_field):
    """Labelled samples with their class index and (when asked) attribute index; the attribute values."""
    data = labelled_samples(samples, label_field).real()
    y = data.labels[:, None]
    attributes = None
    if attribute_field:
        if attribute_field == label_field:
            raise validation.FairBalanceError("attribute_field must differ from label_field")
        adata = labelled_samples(samples.select(data.ids), attribute_field)
        if len(adata.ids) != len(data.ids):
            raise validation.FairBalanceError(
                f"{len(data.ids) - len(adata.ids)} sample(s) with a '{label_field}' label have no "
                f"'{attribute_field}' label")
        position = {i: j for j, i in enumerate(adata.ids)}
        y = np.stack([data.labels, adata.labels[[position[i] for i in data.ids]]], axis=1)
        attributes = adata.classes
    return data, y, attributes


@runs.writer("conditional_diffusion", resumable=True, ignore_for_rerun=RESUME_IGNORES)
def train_conditional_diffusion(
    samples,
    label_field: str = "sa_cluster",
    attribute_field: str | None = None,
    output_dir: str | None = None,
    image_size: int | None = None,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-4,
    cond_drop_prob: float = 0.1,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    seed: int = 0,
    device: str | None = None,
    resume: bool = True,
    checkpoint_every: int = 500,
    loss_weighting: str = "none",
    p2_gamma: float = 1.0,
    p2_k: float = 1.0,
    run_key: str = "conditional_diffusion",
    overwrite: bool = False,
    progress=None,
) -> "DiffusionTrainResult":
    """Train a conditional diffusion model on ``label_field`` (x ``attribute_field``); returns its folder and figures.

    With ``attribute_field`` (e.g. ``label_field="ground_truth"``,
    ``attribute_field="sa_cluster"``) the condition is factorised: one
    embedding per class plus one per attribute value, each droppable, so
    :func:`generate_balanced` with ``mode="cells"`` can fill every class x
    attribute cell. ``image_size``: None = the images' native size (must be
    divisible by 2^(levels - 1)); mixed sizes need an explicit size.
    Clusters with fewer than 10 images are trained anyway, with a warning in
    the run results. With ``resume``, a rerun continues from the last
    checkpoint in ``output_dir`` (refused if that folder or ``run_key``
    holds a different configuration or was trained on other images or
    labels; ``overwrite=True`` starts over). The run key and folder are
    claimed while training, so a second training into either is refused.

    ``loss_weighting="p2"`` (DiffInject, after Choi et al. 2022) weights
    each sample's loss by ``1 / (p2_k + SNR(t))^p2_gamma``, SNR(t) =
    alpha_bar_t / (1 - alpha_bar_t): the noise-prediction loss of the paper
    (for this v-prediction model the v loss is converted first, the
    epsilon loss being ``SNR / (1 + SNR)`` times the v loss), so the
    objective is the paper's; ``"none"`` (default) is the plain MSE.
    ``cond_drop_prob=1.0`` drops every condition: an unconditional model
    (the paper's), still saved and sampled through the same API.
    """
    _check_model_args(samples, seed, device, image_size, block_out_channels, layers_per_block, epochs, batch_size,
                      checkpoint_every)
    data, y, attributes = _factor_labels(samples, label_field, attribute_field)
    classes = data.classes
    if len(classes) < 2 and not attribute_field:
        raise validation.FairBalanceError(f"'{label_field}' has a single cluster; nothing to balance")
    size = native_size(data.filepaths) if image_size is None else [int(image_size)] * 2
    levels = 2 ** (len(block_out_channels) - 1)
    if size[0] != size[1] or size[0] % levels:
        raise validation.FairBalanceError(
            f"image size {size[0]}x{size[1]} does not fit a {len(block_out_channels)}-level UNet: pass a square "
            f"image_size divisible by {levels}")
    distributed.setup(device)
    if batch_size % distributed.world_size():
        raise validation.FairBalanceError(
            f"batch_size {batch_size} (the global batch) must be a multiple of the {distributed.world_size()} "
            "processes it is split over")
    _check_loss_args(lr, cond_drop_prob, loss_weighting, p2_gamma, p2_k)
    cfg = DiffusionTrainConfig(label_field, classes, attribute_field, attributes, size[0], epochs, batch_size, lr,
                               cond_drop_prob, tuple(block_out_channels), layers_per_block, seed=seed,
                               checkpoint_every=checkpoint_every,
                               data_fingerprint=_data_fingerprint(data.filepaths, y, classes, attributes),
                               loss_weighting=loss_weighting, p2_gamma=float(p2_gamma), p2_k=float(p2_k))
    dataset = samples._root_dataset
    output_dir = os.path.abspath(output_dir or folders.default_folder("diffusion", dataset.name, run_key))

    def prepare():  # the main process only (claims, the run, the folder); the others wait for it
        run = runs.prepare(samples, run_key, "conditional_diffusion", {**asdict(cfg), "model_dir": output_dir}, [],
                           overwrite, rerun_same_config=True, ignore_for_rerun=RESUME_IGNORES,
                           defaults_for_unrecorded=ADDED_CONFIG_DEFAULTS)
        folders.claim_output_folder(output_dir, dataset, run_key)  # this run's of this dataset alone
        start_fresh = _check_model_folder(output_dir, cfg, resume, overwrite)
        if start_fresh:  # only what this run wrote there (never a folder or file it did not write)
            folders.remove_listed(output_dir)
        folders.record(output_dir, MODEL_ENTRIES)  # listed before written: a kill leaves nothing unlisted
        return run

    run = distributed.on_main(prepare)
    x = load_images(data.filepaths, size, scale="symmetric", progress=distributed.progress_for(None))
    step, start_step, losses = _fit(cfg, x, torch.as_tensor(y), output_dir, device, resume,
                                    distributed.progress_for(progress))
    if step == start_step and start_step and dataset.has_run(run_key):  # nothing left to train: a finished run
        stored = runs.load_run_results(dataset, run_key)
        if stored.get("steps") == step:  # its record stays as it is (it describes the training that was done)
            names = [f.name for f in dataclasses.fields(DiffusionTrainResult)]
            return DiffusionTrainResult(**{name: stored.get(name) for name in names})
    result = _train_result(run_key, output_dir, step, start_step, losses, y, classes, attributes, batch_size,
                           data.num_unlabelled)
    distributed.on_main(lambda: (run.write(lambda: None), run.save_results(result.to_dict())))
    return result


def _check_model_args(samples, seed, device, image_size, block_out_channels, layers_per_block, epochs, batch_size,
                      checkpoint_every) -> None:
    """The view, the seed, the device and the UNet's shape, before any image is read."""
    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    validation.require_seed(seed)
    validation.require_device(device)
    if image_size is not None:
        validation.require_positive_int("image_size", image_size, minimum=8)
    if (isinstance(block_out_channels, (str, bytes)) or not hasattr(block_out_channels, "__len__")
            or not block_out_channels):
        raise validation.FairBalanceError(
            f"block_out_channels must be a non-empty sequence of channel counts, e.g. (32, 64, 64), got "
            f"{block_out_channels!r}")
    for c in block_out_channels:
        validation.require_positive_int("block_out_channels", c)
    validation.require_positive_int("layers_per_block", layers_per_block)
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        validation.require_positive_int(name, value)


def _check_loss_args(lr, cond_drop_prob, loss_weighting, p2_gamma, p2_k) -> None:
    """The learning rate, the condition dropout and the loss weighting (P2's gamma and k)."""
    if not (np.isfinite(lr) and lr > 0) or not 0 <= cond_drop_prob <= 1:
        raise validation.FairBalanceError("lr must be > 0 and cond_drop_prob in [0, 1] (1 = unconditional)")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise validation.FairBalanceError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, not {loss_weighting!r}")
    for name, value in (("p2_gamma", p2_gamma), ("p2_k", p2_k)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
            raise validation.FairBalanceError(f"{name} must be a finite number >= 0, got {value!r}")
    if loss_weighting == "p2" and p2_k == 0 and p2_gamma > 0:
        raise validation.FairBalanceError("p2_k must be > 0 with loss_weighting='p2' (1 / SNR^gamma is unbounded)")


@dataclass
class DiffusionTrainResult:
    """A trained model: its folder (``os.fspath(result)`` works, so it passes as ``model=``) and how it went."""

    run_key: str
    model_dir: str
    steps: int
    resumed_from_step: int
    final_loss: float | None
    cluster_sizes: dict[str, int]
    small_clusters: dict[str, int]
    cell_sizes: dict[str, int] | None
    num_skipped: int

    def __fspath__(self) -> str:
        return self.model_dir

    def to_dict(self) -> dict:
        return asdict(self)


def _train_result(run_key, output_dir, step, start_step, losses, y, classes, attributes, batch_size,
                  num_unlabelled) -> DiffusionTrainResult:
    """The figures of a training: steps, the last epoch's mean loss, images per cluster (and per cell)."""
    counts = np.bincount(y[:, 0], minlength=len(classes))
    small = {classes[c]: int(n) for c, n in enumerate(counts) if n < MIN_IMAGES_PER_CLUSTER}
    return DiffusionTrainResult(
        run_key, output_dir, step, start_step,
        float(np.mean(losses[-max(1, math.ceil(len(y) / batch_size)):])) if losses else None,
        {classes[c]: int(n) for c, n in enumerate(counts)}, small, _cell_sizes(y, classes, attributes),
        num_unlabelled)


def _data_fingerprint(filepaths, y: np.ndarray, classes, attributes) -> str:
    """A hash of the training images and their labels: a rerun resumes only on the same data."""
    return hashlib.sha1("\n".join(sorted(
        f"{p}\t{classes[r[0]]}" + (f"\t{attributes[r[1]]}" if attributes else "")
        for p, r in zip(filepaths, y))).encode()).hexdigest()


def _cell_sizes(y: np.ndarray, classes, attributes) -> dict | None:
    if not attributes:
        return None
    return dict(Counter(f"{classes[c]}|{attributes[a]}" for c, a in y))


def _check_model_folder(output_dir: str, cfg: DiffusionTrainConfig, resume: bool, overwrite: bool) -> bool:
    """Whether training starts over; refuses a folder of another configuration (or other training data) unless
    ``overwrite`` (:func:`folders.claim_setting`, with the configuration the saved model records)."""
    saved_cfg = os.path.join(output_dir, LABELS_FILE)
    if not os.path.isfile(saved_cfg):
        return True
    try:
        with open(saved_cfg) as f:
            previous = json.load(f)["config"]
    except (OSError, ValueError, KeyError) as e:
        if not overwrite:
            raise validation.FairBalanceError(
                f"{saved_cfg} is unreadable ({e}); pass overwrite=True to train a new model there") from e
        return True
    previous = {**ADDED_CONFIG_DEFAULTS, **previous}  # a model saved before a key existed had its default
    previous["block_out_channels"] = tuple(previous.get("block_out_channels", ()))
    more_epochs = {k: v for k, v in previous.items() if k != "epochs"}  # more epochs of the same model resume
    replaced = folders.claim_setting(output_dir, more_epochs, {k: v for k, v in asdict(cfg).items() if k != "epochs"},
                                     overwrite, kind="a diffusion model (or its training data)")
    return replaced or not resume


def _latest_checkpoint(state_dir: str) -> tuple[str, int] | None:
    """The folder and step of the last complete training checkpoint, if any."""
    pointer = os.path.join(state_dir, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    try:
        with open(pointer) as f:
            latest = json.load(f)
        return os.path.join(state_dir, latest["folder"]), int(latest["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise validation.FairBalanceError(
            f"The training checkpoint pointer {pointer} is corrupt ({e}); delete {state_dir} or pass "
            "overwrite=True to start over") from e


def _step_generator(seed: int, step: int) -> torch.Generator:
    """The noise of one step: a function of the seed and the step alone (resume and N processes draw the same)."""
    return torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)


def _p2_weights(scheduler, t: torch.Tensor, cfg: DiffusionTrainConfig) -> torch.Tensor:
    """Per-sample P2 weights ``1 / (k + SNR(t))^gamma`` of the epsilon loss, in units of the trained target's loss.

    For v-prediction the epsilon error is ``sqrt(alpha_bar)`` times the v
    error, so its squared loss is ``SNR / (1 + SNR)`` times the v loss.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t.cpu()).float().to(t.device)
    weight = (cfg.p2_k + snr) ** -cfg.p2_gamma
    if cfg.prediction_type == "v_prediction":
        weight = weight * snr / (1 + snr)
    return weight


def _fit(cfg: DiffusionTrainConfig, x: torch.Tensor, y: torch.Tensor, output_dir: str, device, resume: bool,
         progress):
    """The training loop (accelerate, EMA, periodic checkpoints that a rerun resumes).

    ``cfg.batch_size`` is the global batch: accelerate splits each one over
    the processes (``split_batches``) and DDP averages their gradients. The
    batch order is a function of (seed, epoch) and each step's noise of
    (seed, step), drawn for the whole global batch and sliced, so N
    processes, one process, and a resumed run take the same steps.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    import fiftyone.core.utils as fou

    dev = distributed.device(device)
    accelerator = Accelerator(mixed_precision="fp16" if dev.type == "cuda" else "no", cpu=dev.type == "cpu",
                              dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True,
                                                                        data_seed=cfg.seed))
    seed_everything(cfg.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size,
                                         shuffle=True, drop_last=False)
    model = _build_model(cfg)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                              prediction_type=cfg.prediction_type)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    ema.to(accelerator.device)
    state_dir = os.path.join(output_dir, STATE_DIR)
    latest = _latest_checkpoint(state_dir) if resume else None
    start_step = _resume(accelerator, ema, state_dir, latest)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    step, losses = start_step, []

    def checkpoint():
        # Each checkpoint goes to a folder of its own; the pointer to it is written last, so a process killed at
        # any moment leaves the previous complete checkpoint in place (never a half-overwritten one). Every
        # process saves its part (accelerate writes the weights and optimizer from the main process, the RNG
        # state of each); the main process alone writes the model, the pointer and removes old checkpoints.
        checkpoint_dir = os.path.join(state_dir, f"step-{step:09d}")
        distributed.on_main(shutil.rmtree, checkpoint_dir, ignore_errors=True)
        with validation.disk_write(f"the training checkpoint of step {step}", state_dir):
            accelerator.save_state(checkpoint_dir)
        accelerator.wait_for_everyone()

        def publish():
            torch.save(ema.state_dict(), os.path.join(checkpoint_dir, "ema.pt"))
            ema_model = _build_model(cfg)
            ema.copy_to(ema_model.parameters())
            _save_model(output_dir, ema_model, scheduler, cfg, step)
            tmp = os.path.join(state_dir, LATEST_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"step": step, "folder": os.path.basename(checkpoint_dir)}, f)
            os.replace(tmp, os.path.join(state_dir, LATEST_FILE))
            for name in os.listdir(state_dir):  # older checkpoints and any a killed process left half-written
                if name.startswith("step-") and name != os.path.basename(checkpoint_dir):
                    shutil.rmtree(os.path.join(state_dir, name), ignore_errors=True)

        with validation.disk_write(f"the training checkpoint of step {step}", state_dir):
            distributed.on_main(publish)

    saved_step = start_step if latest is not None else None
    null = torch.as_tensor(cfg.factor_sizes)
    nproc, rank = accelerator.num_processes, accelerator.process_index
    with fou.ProgressBar(total=total_steps, progress=progress) as pb:
        pb.update(min(start_step, total_steps))
        while step < total_steps:
            model.train()
            epoch, skip = divmod(step, steps_per_epoch)
            loader.set_epoch(epoch)
            for xb, yb in accelerator.skip_first_batches(loader, skip) if skip else loader:
                if step >= total_steps:
                    break
                loss = _batch_loss(model, scheduler, accelerator, cfg, xb, yb, step, null, nproc, rank)
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.step(accelerator.unwrap_model(model).parameters())
                losses.append(float(accelerator.reduce(loss.detach(), "mean")))  # the global batch's loss
                step += 1
                pb.update()
                if step % cfg.checkpoint_every == 0:
                    checkpoint()
                    saved_step = step
    if saved_step != step:
        checkpoint()
    return step, start_step, losses


def _resume(accelerator, ema, state_dir: str, latest: tuple[str, int] | None) -> int:
    """Load the last complete checkpoint (when resuming from one) into the prepared model, optimizer and EMA; its
    step (0 without one)."""
    if latest is None:
        return 0
    try:
        checkpoint_dir, start_step = latest
        accelerator.load_state(checkpoint_dir)
        # tensors and numbers only: a pickle planted in the (user-writable) folder is refused, never run
        ema.load_state_dict(torch.load(os.path.join(checkpoint_dir, "ema.pt"), weights_only=True))
    except Exception as e:  # a truncated or foreign checkpoint: one clear message
        raise validation.FairBalanceError(
            f"The training checkpoint in {state_dir} is corrupt ({type(e).__name__}: {e}); delete that folder "
            "or pass overwrite=True to start over") from e
    return start_step


def _batch_loss(model, scheduler, accelerator, cfg: DiffusionTrainConfig, xb: torch.Tensor, yb: torch.Tensor,
                step: int, null: torch.Tensor, nproc: int, rank: int) -> torch.Tensor:
    """One step's loss on this process's rows of the global batch, with their rows of the noise, timesteps and
    condition drops drawn for all of it (a function of the seed and the step alone)."""
    part = slice(rank * len(xb), (rank + 1) * len(xb))
    gen = _step_generator(cfg.seed, step)
    n = len(xb) * nproc
    noise = torch.randn((n,) + tuple(xb.shape[1:]), generator=gen)[part].to(xb.device)
    t = torch.randint(0, cfg.num_train_timesteps, (n,), generator=gen)[part].to(xb.device)
    drop = (torch.rand((n,) + tuple(yb.shape[1:]), generator=gen)[part] < cfg.cond_drop_prob).to(yb.device)
    labels = torch.where(drop, null.to(yb.device).expand_as(yb), yb)
    noisy = scheduler.add_noise(xb, noise, t)
    with accelerator.autocast():
        pred = model(noisy, t, labels)
    target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(xb, noise, t)
    if cfg.loss_weighting == "p2":
        return (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                * _p2_weights(scheduler, t, cfg)).mean()
    return F.mse_loss(pred.float(), target.float())
