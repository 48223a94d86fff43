"""Conditional diffusion models: training on pseudo-labels (x an attribute), loading and sampling.

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

Sampling: DDIM or DDPM with compositional classifier-free guidance, from
noise or from a real image noised part of the way (an edit). What to generate
and how it joins the dataset is :mod:`fairbalance.generate.generation`.
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

from fairbalance.core import claims, distributed, folders, models, runs, validation
from fairbalance.core.data import labelled_samples, load_images, native_size, seed_everything

LABELS_FILE = "fairbalance_labels.json"
CONDITION_FILE = "condition.safetensors"
STATE_DIR = "training_state"
LATEST_FILE = "latest.json"  # in STATE_DIR: the step and folder of the last complete checkpoint
# what training writes in its folder (listed there before it is written, so overwrite deletes these and nothing else)
MODEL_ENTRIES = ("unet", "scheduler", CONDITION_FILE, CONDITION_FILE + ".tmp", LABELS_FILE, LABELS_FILE + ".tmp",
                 STATE_DIR)
MIN_IMAGES_PER_CLUSTER = 10
SCHEDULERS = ("ddim", "ddpm")
LOSS_WEIGHTINGS = ("none", "p2")
# Config keys added after models were first saved, with the value those models were trained with.
ADDED_CONFIG_DEFAULTS = {"loss_weighting": "none", "p2_gamma": 1.0, "p2_k": 1.0}


@dataclass
class DiffusionTrainConfig:
    label_field: str
    classes: list[str]
    attribute_field: str | None = None
    attribute_classes: list[str] | None = None  # ("attributes" would shadow a FiftyOne RunConfig method)
    image_size: int = 32
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-4
    cond_drop_prob: float = 0.1
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    num_train_timesteps: int = 1000
    ema_decay: float = 0.999
    prediction_type: str = "v_prediction"
    seed: int = 0
    checkpoint_every: int = 500
    data_fingerprint: str = ""  # of the training images and labels: resume only on the same data
    loss_weighting: str = "none"  # "none" (plain MSE) or "p2" (Choi et al. 2022: 1 / (p2_k + SNR(t))^p2_gamma)
    p2_gamma: float = 1.0
    p2_k: float = 1.0

    @property
    def factor_sizes(self) -> list[int]:
        """Values per conditioning factor: the class, then the attribute (when there is one)."""
        return [len(self.classes)] + ([len(self.attribute_classes)] if self.attribute_field else [])

    @property
    def null_class(self) -> int:
        return len(self.classes)


class FactorisedCondition(torch.nn.Module):
    """One embedding table per factor (class, attribute), each with a "null" row, summed.

    Each factor is dropped to its null row on its own during training, so
    the model learns "class c" and "attribute a" separately as well as
    together: a cell (c, a) with few or no training images can then be asked
    for by composition, with guidance per factor.
    """

    def __init__(self, factor_sizes: list[int], dim: int):
        super().__init__()
        self.factor_sizes = list(factor_sizes)
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(n + 1, dim) for n in self.factor_sizes)

    def null(self, n: int, device=None) -> torch.Tensor:
        return torch.tensor(self.factor_sizes, device=device).expand(n, -1).clone()

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return sum(table(labels[:, f]) for f, table in enumerate(self.tables))


class ConditionalUNet(torch.nn.Module):
    """A diffusers ``UNet2DModel`` whose class embedding is the factorised condition."""

    def __init__(self, unet, condition: FactorisedCondition):
        super().__init__()
        self.unet, self.condition = unet, condition

    def forward(self, x, t, labels):
        return self.unet(x, t, class_labels=self.condition(labels).to(x.dtype)).sample


def _build_model(cfg: DiffusionTrainConfig) -> ConditionalUNet:
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    unet = UNet2DModel(
        sample_size=cfg.image_size, in_channels=3, out_channels=3, layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=min(32, cfg.block_out_channels[0]), class_embed_type="identity",
    )
    return ConditionalUNet(unet, FactorisedCondition(cfg.factor_sizes, cfg.block_out_channels[0] * 4))


def _save_model(folder: str, model: ConditionalUNet, scheduler, cfg: DiffusionTrainConfig, step: int) -> None:
    """UNet, condition tables and scheduler, then the label file last (what loading looks for)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    model.unet.save_pretrained(os.path.join(folder, "unet"))
    tmp = os.path.join(folder, CONDITION_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in model.condition.state_dict().items()}, tmp)
    os.replace(tmp, os.path.join(folder, CONDITION_FILE))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    tmp = os.path.join(folder, LABELS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"config": asdict(cfg), "classes": cfg.classes, "attributes": cfg.attribute_classes,
                   "null_class": cfg.null_class, "step": step}, f, indent=1)
    os.replace(tmp, os.path.join(folder, LABELS_FILE))


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


@claims.exclusive
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
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        validation.require_positive_int(name, value)
    distributed.setup(device)
    if batch_size % distributed.world_size():
        raise validation.FairBalanceError(
            f"batch_size {batch_size} (the global batch) must be a multiple of the {distributed.world_size()} "
            "processes it is split over")
    if not (np.isfinite(lr) and lr > 0) or not 0 <= cond_drop_prob <= 1:
        raise validation.FairBalanceError("lr must be > 0 and cond_drop_prob in [0, 1] (1 = unconditional)")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise validation.FairBalanceError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, not {loss_weighting!r}")
    for name, value in (("p2_gamma", p2_gamma), ("p2_k", p2_k)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and np.isfinite(value) and value >= 0):
            raise validation.FairBalanceError(f"{name} must be a finite number >= 0, got {value!r}")
    if loss_weighting == "p2" and p2_k == 0 and p2_gamma > 0:
        raise validation.FairBalanceError("p2_k must be > 0 with loss_weighting='p2' (1 / SNR^gamma is unbounded)")
    fingerprint = hashlib.sha1("\n".join(sorted(
        f"{p}\t{classes[r[0]]}" + (f"\t{attributes[r[1]]}" if attributes else "")
        for p, r in zip(data.filepaths, y))).encode())
    cfg = DiffusionTrainConfig(label_field, classes, attribute_field, attributes, size[0], epochs, batch_size, lr,
                               cond_drop_prob, tuple(block_out_channels), layers_per_block, seed=seed,
                               checkpoint_every=checkpoint_every, data_fingerprint=fingerprint.hexdigest(),
                               loss_weighting=loss_weighting, p2_gamma=float(p2_gamma), p2_k=float(p2_k))
    dataset = samples._root_dataset
    output_dir = os.path.abspath(output_dir or folders.default_folder("diffusion", dataset.name, run_key))

    def prepare():  # the main process only (claims, the run, the folder); the others wait for it
        run = runs.prepare(samples, run_key, "conditional_diffusion", {**asdict(cfg), "model_dir": output_dir}, [],
                           overwrite, rerun_same_config=True, ignore_for_rerun=("epochs",),
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
    counts = np.bincount(y[:, 0], minlength=len(classes))
    small = {classes[c]: int(n) for c, n in enumerate(counts) if n < MIN_IMAGES_PER_CLUSTER}
    result = DiffusionTrainResult(
        run_key, output_dir, step, start_step,
        float(np.mean(losses[-max(1, math.ceil(len(y) / batch_size)):])) if losses else None,
        {classes[c]: int(n) for c, n in enumerate(counts)}, small, _cell_sizes(y, classes, attributes),
        data.num_unlabelled)
    distributed.on_main(lambda: (run.write(lambda: None), run.save_results(result.to_dict())))
    return result


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


def _cell_sizes(y: np.ndarray, classes, attributes) -> dict | None:
    if not attributes:
        return None
    return dict(Counter(f"{classes[c]}|{attributes[a]}" for c, a in y))


def _check_model_folder(output_dir: str, cfg: DiffusionTrainConfig, resume: bool, overwrite: bool) -> bool:
    """Whether training starts over; refuses a folder of another configuration unless ``overwrite``."""
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
    same = {k: v for k, v in previous.items() if k != "epochs"} == {
        k: v for k, v in asdict(cfg).items() if k != "epochs"}
    if not same and not overwrite:
        raise validation.FairBalanceError(
            f"{output_dir} holds a diffusion model with another configuration or other training data; "
            "pass overwrite=True or choose another output_dir"
        )
    return not (resume and same)


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
    start_step = 0
    latest = _latest_checkpoint(state_dir) if resume else None
    if latest is not None:
        try:
            checkpoint_dir, start_step = latest
            accelerator.load_state(checkpoint_dir)
            # tensors and numbers only: a pickle planted in the (user-writable) folder is refused, never run
            ema.load_state_dict(torch.load(os.path.join(checkpoint_dir, "ema.pt"), weights_only=True))
        except Exception as e:  # a truncated or foreign checkpoint: one clear message
            raise validation.FairBalanceError(
                f"The training checkpoint in {state_dir} is corrupt ({type(e).__name__}: {e}); delete that folder "
                "or pass overwrite=True to start over") from e
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
                # this process's rows of the global batch, and their rows of noise drawn for all of it
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
                    loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                            * _p2_weights(scheduler, t, cfg)).mean()
                else:
                    loss = F.mse_loss(pred.float(), target.float())
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


@dataclass
class ConditionalDiffusionModel:
    model: ConditionalUNet
    classes: list[str]
    attributes: list[str] | None
    config: dict
    folder: str
    step: int = 0

    @property
    def unet(self):
        return self.model.unet

    @property
    def null_class(self) -> int:
        return len(self.classes)

    @property
    def label_field(self) -> str:
        return self.config["label_field"]

    @property
    def attribute_field(self) -> str | None:
        return self.config.get("attribute_field")


def load_conditional_diffusion(folder: str, device=None) -> ConditionalDiffusionModel:
    """Load a model saved by :func:`train_conditional_diffusion`."""
    from diffusers import DDPMScheduler, UNet2DModel
    from safetensors.torch import load_file

    path = os.path.join(folder, LABELS_FILE)
    if not os.path.isfile(path):
        raise models.ModelNotFoundError(f"No conditional diffusion model in {folder} ({LABELS_FILE} missing)")
    try:
        with open(path) as f:
            meta = json.load(f)
        cfg = DiffusionTrainConfig(**{**meta["config"], "block_out_channels": tuple(meta["config"]["block_out_channels"])})
        unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet"))
        condition = FactorisedCondition(cfg.factor_sizes, cfg.block_out_channels[0] * 4)
        condition.load_state_dict(load_file(os.path.join(folder, CONDITION_FILE)))
        DDPMScheduler.load_config(os.path.join(folder, "scheduler"))  # read when sampling: checked before any write
    except Exception as e:  # truncated/corrupt json, weights or tables: one clear message naming the folder
        raise models.ModelNotFoundError(
            f"The conditional diffusion model in {folder} is corrupt or incomplete ({type(e).__name__}: {e}); "
            "train it again (overwrite=True)") from e
    model = ConditionalUNet(unet, condition).to(models.resolve_device(device)).eval()
    return ConditionalDiffusionModel(model, meta["classes"], meta.get("attributes"), meta["config"],
                                     os.path.abspath(folder), int(meta.get("step", 0)))


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
                  inversion_labels=None) -> np.ndarray:
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
    if (inversion or keep_background) and init_images is None:
        raise validation.FairBalanceError("inversion and keep_background edit an image: pass init_images")
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
    if keep_background:
        src = init_images.to(dev)
        keep = background_mask(src)
        x = torch.where(keep, src, x)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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
