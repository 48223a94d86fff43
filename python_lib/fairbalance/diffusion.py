"""Class-conditional diffusion on pseudo-labels, and balanced generation (Suayama & Nakamura, III-D).

Training: a diffusers ``UNet2DModel`` with a class embedding for every
cluster plus one "null" class for classifier-free guidance (labels are
dropped to it with probability ``cond_drop_prob``), the DDPM cosine noise
schedule with v-prediction (with epsilon-prediction the few training steps a
CPU affords left global colour to the initial noise instead of the class),
EMA weights, AMP on GPU, and periodic checkpoints that a rerun resumes from.
``accelerate`` runs the loop, so several GPUs work unchanged.

Generation: the same number of images from every cluster (``mode="equal"``,
the paper's rule) or enough to bring every cluster up to the largest one
(``mode="fill"``), with classifier-free guidance and a DDIM (or DDPM)
sampler. Every image has its own seed, so reruns are idempotent and an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance import config as fb_config
from fairbalance import models, runs, training, validation, writeback

LABELS_FILE = "fairbalance_labels.json"
CONDITION_FILE = "condition.safetensors"
GENERATION_FILE = "fairbalance_generation.json"
STATE_DIR = "training_state"
MIN_IMAGES_PER_CLUSTER = 10
SCHEDULERS = ("ddim", "ddpm")


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
    data = training.labelled_samples(samples, label_field)
    data = data.subset(np.flatnonzero(~data.generated))
    if not len(data.ids):
        raise validation.FairBalanceError("The view has no real (non-generated) labelled samples")
    y = data.labels[:, None]
    attributes = None
    if attribute_field:
        if attribute_field == label_field:
            raise validation.FairBalanceError("attribute_field must differ from label_field")
        adata = training.labelled_samples(samples.select(data.ids), attribute_field)
        if len(adata.ids) != len(data.ids):
            raise validation.FairBalanceError(
                f"{len(data.ids) - len(adata.ids)} sample(s) with a '{label_field}' label have no "
                f"'{attribute_field}' label")
        position = {i: j for j, i in enumerate(adata.ids)}
        y = np.stack([data.labels, adata.labels[[position[i] for i in data.ids]]], axis=1)
        attributes = adata.classes
    return data, y, attributes


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
    run_key: str = "conditional_diffusion",
    overwrite: bool = False,
    progress=None,
) -> str:
    """Train a conditional diffusion model on ``label_field`` (x ``attribute_field``); returns its folder.

    With ``attribute_field`` (e.g. ``label_field="ground_truth"``,
    ``attribute_field="sa_cluster"``) the condition is factorised: one
    embedding per class plus one per attribute value, each droppable, so
    :func:`generate_balanced` with ``mode="cells"`` can fill every class x
    attribute cell. ``image_size``: None = the images' native size (must be
    divisible by 2^(levels - 1)); mixed sizes need an explicit size.
    Clusters with fewer than 10 images are trained anyway, with a warning in
    the run results. With ``resume``, a rerun continues from the last
    checkpoint in ``output_dir`` (refused if that folder holds a different
    configuration or was trained on other images or labels;
    ``overwrite=True`` starts over).
    """
    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    data, y, attributes = _factor_labels(samples, label_field, attribute_field)
    classes = data.classes
    if len(classes) < 2 and not attribute_field:
        raise validation.FairBalanceError(f"'{label_field}' has a single cluster; nothing to balance")
    size = training.native_size(data.filepaths) if image_size is None else [int(image_size)] * 2
    levels = 2 ** (len(block_out_channels) - 1)
    if size[0] != size[1] or size[0] % levels:
        raise validation.FairBalanceError(
            f"image size {size[0]}x{size[1]} does not fit a {len(block_out_channels)}-level UNet: pass a square "
            f"image_size divisible by {levels}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        validation.require_positive_int(name, value)
    if not (np.isfinite(lr) and lr > 0) or not 0 <= cond_drop_prob < 1:
        raise validation.FairBalanceError("lr must be > 0 and cond_drop_prob in [0, 1)")
    fingerprint = hashlib.sha1("\n".join(sorted(
        f"{p}\t{classes[r[0]]}" + (f"\t{attributes[r[1]]}" if attributes else "")
        for p, r in zip(data.filepaths, y))).encode())
    cfg = DiffusionTrainConfig(label_field, classes, attribute_field, attributes, size[0], epochs, batch_size, lr,
                               cond_drop_prob, tuple(block_out_channels), layers_per_block, seed=seed,
                               checkpoint_every=checkpoint_every, data_fingerprint=fingerprint.hexdigest())
    dataset = samples._root_dataset
    output_dir = os.path.abspath(output_dir or os.path.join(fb_config.data_dir(), "diffusion", dataset.name, run_key))
    start_fresh = _check_model_folder(output_dir, cfg, resume, overwrite)
    run = runs.prepare(samples, run_key, "conditional_diffusion",
                       {**asdict(cfg), "model_dir": output_dir, "resume": resume}, [], overwrite=True)
    if start_fresh and os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    validation.require_writable_dir(output_dir)
    x = training.load_images(data.filepaths, size, scale="symmetric")
    step, start_step, losses = _fit(cfg, x, torch.as_tensor(y), output_dir, device, resume, progress)
    counts = np.bincount(y[:, 0], minlength=len(classes))
    small = {classes[c]: int(n) for c, n in enumerate(counts) if n < MIN_IMAGES_PER_CLUSTER}
    run.write(lambda: None)
    run.save_results({
        "model_dir": output_dir, "steps": step, "resumed_from_step": start_step,
        "final_loss": float(np.mean(losses[-max(1, math.ceil(len(y) / batch_size)):])) if losses else None,
        "cluster_sizes": {classes[c]: int(n) for c, n in enumerate(counts)}, "small_clusters": small,
        "cell_sizes": _cell_sizes(y, classes, attributes), "num_skipped": data.num_unlabelled,
    })
    return output_dir


def _cell_sizes(y: np.ndarray, classes, attributes) -> dict | None:
    if not attributes:
        return None
    cells = {}
    for c, a in y:
        key = f"{classes[c]}|{attributes[a]}"
        cells[key] = cells.get(key, 0) + 1
    return cells


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
    previous["block_out_channels"] = tuple(previous.get("block_out_channels", ()))
    same = {k: v for k, v in previous.items() if k != "epochs"} == {
        k: v for k, v in asdict(cfg).items() if k != "epochs"}
    if not same and not overwrite:
        raise validation.FairBalanceError(
            f"{output_dir} holds a diffusion model with another configuration or other training data; "
            "pass overwrite=True or choose another output_dir"
        )
    return not (resume and same)


def _fit(cfg: DiffusionTrainConfig, x: torch.Tensor, y: torch.Tensor, output_dir: str, device, resume: bool,
         progress):
    """The training loop (accelerate, EMA, periodic checkpoints that a rerun resumes)."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    import fiftyone.core.utils as fou

    dev = models.resolve_device(device)
    accelerator = Accelerator(mixed_precision="fp16" if dev.type == "cuda" else "no", cpu=dev.type == "cpu")
    gen = training.seed_everything(cfg.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size,
                                         shuffle=True, generator=gen, drop_last=False)
    model = _build_model(cfg)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                              prediction_type=cfg.prediction_type)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    ema = EMAModel(model.parameters(), decay=cfg.ema_decay)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    ema.to(accelerator.device)
    state_dir = os.path.join(output_dir, STATE_DIR)
    start_step = 0
    if resume and os.path.isfile(os.path.join(state_dir, "step.json")):
        try:
            accelerator.load_state(state_dir)
            ema.load_state_dict(torch.load(os.path.join(state_dir, "ema.pt"), weights_only=False))
            with open(os.path.join(state_dir, "step.json")) as f:
                start_step = json.load(f)["step"]
        except Exception as e:  # a truncated or foreign checkpoint: one clear message
            raise validation.FairBalanceError(
                f"The training checkpoint in {state_dir} is corrupt ({type(e).__name__}: {e}); delete that folder "
                "or pass overwrite=True to start over") from e
    total_steps = cfg.epochs * len(loader)
    step, losses = start_step, []

    def checkpoint():
        accelerator.save_state(state_dir)
        torch.save(ema.state_dict(), os.path.join(state_dir, "ema.pt"))
        ema_model = _build_model(cfg)
        ema.copy_to(ema_model.parameters())
        _save_model(output_dir, ema_model, scheduler, cfg, step)
        tmp = os.path.join(state_dir, "step.json.tmp")
        with open(tmp, "w") as f:  # written last: a checkpoint counts only once complete
            json.dump({"step": step}, f)
        os.replace(tmp, os.path.join(state_dir, "step.json"))

    null = torch.as_tensor(cfg.factor_sizes)
    noise_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + start_step)
    with fou.ProgressBar(total=total_steps, progress=progress) as pb:
        pb.update(min(start_step, total_steps))
        while step < total_steps:
            model.train()
            for xb, yb in loader:
                if step >= total_steps:
                    break
                noise = torch.randn(xb.shape, generator=noise_gen).to(xb.device)
                t = torch.randint(0, cfg.num_train_timesteps, (len(xb),), generator=noise_gen).to(xb.device)
                drop = (torch.rand(yb.shape, generator=noise_gen) < cfg.cond_drop_prob).to(yb.device)
                labels = torch.where(drop, null.to(yb.device).expand_as(yb), yb)
                noisy = scheduler.add_noise(xb, noise, t)
                with accelerator.autocast():
                    pred = model(noisy, t, labels)
                target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(xb, noise, t)
                loss = F.mse_loss(pred.float(), target.float())
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.step(accelerator.unwrap_model(model).parameters())
                losses.append(float(loss.detach()))
                step += 1
                pb.update()
                if step % cfg.checkpoint_every == 0:
                    checkpoint()
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
    from diffusers import UNet2DModel
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
                  reference_labels=None) -> np.ndarray:
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
    if init_images is not None:
        start = min(len(timesteps) - 1, int(round(len(timesteps) * (1 - (edit_strength or 1.0)))))
        timesteps = timesteps[start:]
        x = sched.add_noise(init_images.to(dev), x, timesteps[:1].repeat(len(x)))
    null = net.condition.null(len(x), dev)
    partial = cond.clone()
    if nfactors > 1:
        partial[:, 1:] = null[:, 1:]  # class only
    s_c = guidance_scale
    s_a = guidance_scale if attribute_guidance_scale is None else attribute_guidance_scale
    step_gens = [torch.Generator().manual_seed(s + 1) for s in seeds]  # per-image noise: batch-independent
    ref = None if reference_labels is None else torch.as_tensor(np.asarray(reference_labels), device=dev).long()
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
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def plan_counts(counts: dict[str, int], mode: str = "equal", total: int | None = None,
                per_class: int | None = None) -> dict[str, int]:
    """How many images to generate per cluster (or per cell, for ``cells``).

    ``equal``: ``per_class`` each, or ``total // M`` each (the paper: 2000/M);
    ``fill``: up to the size of the largest cluster; ``cells``: every cell up
    to ``per_class`` images (real + generated).
    """
    m = len(counts)
    if mode == "equal":
        if per_class is None:
            if total is None:
                raise validation.FairBalanceError("mode='equal' needs total or per_class")
            if total < m:
                raise validation.FairBalanceError(f"total={total} is smaller than the {m} clusters")
            per_class = total // m
        validation.require_positive_int("per_class", per_class)
        return {c: per_class for c in counts}
    if mode == "fill":
        largest = max(counts.values())
        return {c: largest - n for c, n in counts.items()}
    if mode == "cells":
        if per_class is None:
            raise validation.FairBalanceError("mode='cells' needs per_cell: the images every cell should have")
        validation.require_positive_int("per_cell", per_class)
        return {c: max(0, per_class - n) for c, n in counts.items()}
    raise validation.FairBalanceError(f"mode must be 'equal', 'fill' or 'cells', not {mode!r}")


@dataclass
class _Job:
    """One image to generate: its condition, seed, file, sample fields, and source image for an edit."""

    condition: tuple[int, ...]
    seed: int
    filepath: str
    key: str
    fields: dict
    source: tuple[str, str] | None = None  # (sample id, filepath)
    source_condition: tuple[int, ...] | None = None


def _cell_jobs(samples, diff: ConditionalDiffusionModel, per_cell: int, source: str, seed: int, output_dir: str):
    """Jobs that fill every class x attribute cell of the view's real samples up to ``per_cell``."""
    real = training.labelled_samples(samples, diff.label_field, diff.classes)
    real = real.subset(np.flatnonzero(~real.generated))
    attr = dict(zip(*samples.select(real.ids).values(["id", _label_path(samples, diff.attribute_field)])))
    index = {a: j for j, a in enumerate(diff.attributes)}
    cells = np.array([[c, index.get(attr.get(i), -1)] for c, i in zip(real.labels, real.ids)])
    counts = {(ci, ai): int(np.sum((cells[:, 0] == ci) & (cells[:, 1] == ai)))
              for ci in range(len(diff.classes)) for ai in range(len(diff.attributes))}
    plan = plan_counts(counts, "cells", per_class=per_cell)
    jobs = []
    for (ci, ai), n in plan.items():
        candidates = np.flatnonzero((cells[:, 0] == ci) & (cells[:, 1] != ai) & (cells[:, 1] >= 0))
        if source == "edit" and n and not len(candidates):
            candidates = np.flatnonzero((cells[:, 0] == ci) & (cells[:, 1] >= 0))
        if source == "edit" and n and not len(candidates):
            raise validation.FairBalanceError(f"source='edit': no real image of class '{diff.classes[ci]}' to edit")
        c, a = diff.classes[ci], diff.attributes[ai]
        for i in range(n):
            img_seed = seed * 1_000_003 + ci * 100_003 + ai * 1_009 + i
            src = src_cond = None
            if source == "edit":
                j = candidates[np.random.default_rng([seed, ci, ai, i]).integers(len(candidates))]
                src, src_cond = (real.ids[j], real.filepaths[j]), (ci, int(cells[j, 1]))
            jobs.append(_Job((ci, ai), img_seed, os.path.join(output_dir, f"cell{ci}x{ai}_seed{seed}_{i:05d}.png"),
                             f"{c}|{a}", {diff.label_field: c, diff.attribute_field: a}, src, src_cond))
    return jobs, {f"{diff.classes[ci]}|{diff.attributes[ai]}": n for (ci, ai), n in plan.items()}


def _cluster_jobs(samples, diff: ConditionalDiffusionModel, mode, total, per_class, seed, output_dir):
    """Jobs that balance the clusters of a single-condition model (``equal`` or ``fill``)."""
    from fiftyone import ViewField as Fv

    path = _label_path(samples, diff.label_field)
    real = samples.match(Fv("generated") != True) if samples._root_dataset.has_field("generated") else samples  # noqa
    present = real.count_values(path)
    plan = plan_counts({c: present.get(c, 0) for c in diff.classes}, mode, total, per_class)
    jobs = [_Job((ci,), seed * 1_000_003 + ci * 100_003 + i,
                 os.path.join(output_dir, f"cluster{c}_seed{seed}_{i:05d}.png"), c, {diff.label_field: c})
            for ci, c in enumerate(diff.classes) for i in range(plan[c])]
    return jobs, plan


def _label_path(samples, field_name):
    from fairbalance.balance import label_path

    return label_path(samples, field_name)


def generate_balanced(
    samples,
    label_field: str = "sa_cluster",
    model: str | None = None,
    total: int | None = None,
    per_class: int | None = None,
    mode: str = "equal",
    per_cell: int | None = None,
    source: str = "noise",
    edit_strength: float = 0.5,
    guidance_scale: float = 3.0,
    attribute_guidance_scale: float | None = None,
    guidance_reference: str = "null",
    num_inference_steps: int = 50,
    scheduler: str = "ddim",
    output_dir: str | None = None,
    target_dataset=None,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    run_key: str = "generate_balanced",
    overwrite: bool = False,
    progress=None,
) -> dict:
    """Generate images per cluster, or per class x attribute cell, and add them with provenance.

    ``mode``: ``equal`` / ``fill`` balance the clusters of a model trained on
    one field (Suayama & Nakamura); ``cells`` fills every cell of a factorised
    model (``train_conditional_diffusion(..., attribute_field=...)``) up to
    ``per_cell`` images, real ones counted. ``source="edit"`` (cells only)
    starts each image from a real image of the same class with another
    attribute, noised to ``edit_strength`` of the schedule and denoised under
    the new condition, so the class's shape comes from a real image;
    ``"noise"`` samples from pure noise. ``guidance_reference``: ``"null"``
    (compositional classifier-free guidance, ``guidance_scale`` toward the
    class, ``attribute_guidance_scale`` toward the attribute) or, for edits,
    ``"source"`` (guide from the source image's own cell toward the asked
    one with ``attribute_guidance_scale``; see :func:`sample_images`).

    New samples get ``generated=True``, the condition's label field(s) (the
    class label for cells, so classifiers can train on them),
    ``generation`` (model, sampler, seed, cell, source sample) and the tag
    ``generated``. Image ``i`` of a cell always has the same seed, so a
    rerun adds nothing twice and an interrupted run continues where it
    stopped. An ``output_dir`` that holds images of another model or
    setting is refused; ``overwrite=True`` deletes those images and their
    samples first. Returns the counts added and planned.
    """
    validation.require_nonempty(samples)
    if model is None:
        raise validation.FairBalanceError("model: pass the folder returned by train_conditional_diffusion")
    if source not in ("noise", "edit"):
        raise validation.FairBalanceError(f"source must be 'noise' or 'edit', not {source!r}")
    validate_sampling(guidance_scale, num_inference_steps, scheduler, attribute_guidance_scale,
                      edit_strength if source == "edit" else None)
    validation.require_positive_int("batch_size", batch_size)
    diff = load_conditional_diffusion(model, device)
    if diff.label_field != label_field:
        raise validation.FairBalanceError(f"The model was trained on '{diff.label_field}', not '{label_field}'")
    if (mode == "cells") != bool(diff.attribute_field):
        raise validation.FairBalanceError(
            "mode='cells' needs a model trained with attribute_field (class x attribute), and such a model "
            f"generates only cells; this model is conditioned on {[label_field, diff.attribute_field]}")
    if source == "edit" and mode != "cells":
        raise validation.FairBalanceError("source='edit' works with mode='cells'")
    if guidance_reference not in ("null", "source"):
        raise validation.FairBalanceError(f"guidance_reference must be 'null' or 'source', not {guidance_reference!r}")
    if guidance_reference == "source" and source != "edit":
        raise validation.FairBalanceError("guidance_reference='source' needs source='edit' (a source image)")
    target, output_dir = writeback.generation_target(samples, target_dataset, output_dir, run_key)
    if mode == "cells":
        jobs, plan = _cell_jobs(samples, diff, per_cell, source, seed, output_dir)
    else:
        jobs, plan = _cluster_jobs(samples, diff, mode, total, per_class, seed, output_dir)
    setting = {"model": diff.folder, "model_step": diff.step, "label_field": label_field,
               "attribute_field": diff.attribute_field, "guidance_scale": guidance_scale,
               "attribute_guidance_scale": attribute_guidance_scale, "guidance_reference": guidance_reference,
               "num_inference_steps": num_inference_steps,
               "scheduler": scheduler, "source": source, "edit_strength": edit_strength if source == "edit" else None}
    _claim_output_dir(output_dir, target, setting, overwrite)
    provenance = {**setting, "mode": mode, "run_key": run_key}
    existing = set(target.values("filepath")) if len(target) else set()
    jobs = [j for j in jobs if j.filepath not in existing]
    added = _run_jobs(diff, jobs, target, provenance, batch_size, progress)
    result = {"added": {k: added.get(k, 0) for k in plan}, "planned": plan, "output_dir": output_dir,
              "target_dataset": target.name, "run_key": run_key}
    run = runs.prepare(target, run_key, "generate_balanced", {
        **provenance, "total": total, "per_class": per_class, "per_cell": per_cell, "seed": seed}, [], overwrite=True)
    run.write(lambda: None)
    run.save_results(result)
    return result


def _run_jobs(diff: ConditionalDiffusionModel, jobs: list[_Job], target, provenance: dict, batch_size: int,
              progress) -> dict[str, int]:
    """Generate batch by batch: image files (temp + rename), then their samples, in bulk per batch."""
    import fiftyone as fo
    import fiftyone.core.utils as fou
    from PIL import Image

    added: dict[str, int] = {}
    size = diff.unet.config.sample_size
    with fou.ProgressBar(total=len(jobs), progress=progress) as pb:
        for b in range(0, len(jobs), batch_size):
            batch = jobs[b: b + batch_size]
            todo = [j for j in batch if not os.path.isfile(j.filepath)]
            if todo:
                init = None
                if todo[0].source is not None:
                    init = training.load_images([j.source[1] for j in todo], [size, size], scale="symmetric")
                reference = [j.source_condition for j in todo] if provenance["guidance_reference"] == "source" else None
                imgs = sample_images(diff, [j.condition for j in todo], [j.seed for j in todo],
                                     provenance["guidance_scale"], provenance["num_inference_steps"],
                                     provenance["scheduler"], provenance["attribute_guidance_scale"], init,
                                     provenance["edit_strength"] if init is not None else None, reference)
                for job, img in zip(todo, imgs):
                    tmp = job.filepath + ".tmp.png"
                    Image.fromarray(img).save(tmp)
                    os.replace(tmp, job.filepath)
            new = []
            for job in batch:
                extra = {"source_id": job.source[0], "source_filepath": job.source[1]} if job.source else {}
                new.append(fo.Sample(filepath=job.filepath, tags=["generated"], generated=True,
                                     generation={**provenance, "seed": job.seed, "cell": job.key, **extra},
                                     **{f: fo.Classification(label=v) for f, v in job.fields.items()}))
                added[job.key] = added.get(job.key, 0) + 1
            target.add_samples(new, progress=False)
            pb.update(len(batch))
    return added


def _claim_output_dir(folder: str, target, setting: dict, overwrite: bool) -> None:
    """Make ``folder`` hold images of ``setting`` only: refuse another setting's images unless ``overwrite``.

    Reruns reuse existing files by name, so a folder written by another model
    (or the same folder after more training) must not be mixed in silently.
    """
    import glob

    manifest = os.path.join(folder, GENERATION_FILE)
    previous = None
    if os.path.isfile(manifest):
        with open(manifest) as f:
            previous = json.load(f)
    images_there = [p for pattern in ("cluster*_seed*.png", "cell*x*_seed*.png")
                    for p in glob.glob(os.path.join(folder, pattern))]
    if previous == setting:
        return
    if previous is not None or images_there:
        if not overwrite:
            what = f"images of {previous}" if previous else f"{len(images_there)} images of an unknown run"
            raise validation.FairBalanceError(
                f"{folder} already holds {what}; pass overwrite=True to replace them or choose another output_dir")
        if len(target):
            from fiftyone import ViewField as Fv

            target.delete_samples(target.match(Fv("filepath").is_in(images_there)))
        for p in images_there:
            os.remove(p)
    tmp = manifest + ".tmp"
    with open(tmp, "w") as f:
        json.dump(setting, f, indent=1)
    os.replace(tmp, manifest)


def filter_generated(
    samples,
    label_field: str = "sa_cluster",
    embeddings_field: str = "clip_embedding",
    score_field: str = "generation_score",
    tag: str = "low_quality",
    threshold: float | None = None,
    bottom_fraction: float | None = 0.1,
    method: str = "clip",
    texts: dict[str, str] | None = None,
    batch_size: int = 64,
    device: str | None = None,
    run_key: str = "filter_generated",
    overwrite: bool = False,
    progress=None,
) -> dict:
    """Score generated images by CLIP similarity to their cluster and tag the worst (Clustered DreamBooth).

    The condition of cluster c is the centroid of the stored CLIP embeddings
    of the *real* samples of c (same model as ``embeddings_field``), or, with
    ``texts`` (cluster -> text, e.g. a caption that describes the cluster),
    the CLIP embedding of that text. Each generated image is scored by cosine
    similarity to its condition, stored in ``score_field``, and tagged
    ``tag`` when below ``threshold`` or in the ``bottom_fraction``.
    Retagging replaces the previous tags. ``method``: only ``"clip"``.
    """
    from fiftyone import ViewField as Fv

    from fairbalance import embeddings
    from fairbalance.balance import label_path

    validation.require_nonempty(samples)
    validation.require_fields(samples, [label_field, embeddings_field, "generated"])
    if (threshold is None) == (bottom_fraction is None):
        raise validation.FairBalanceError("pass exactly one of threshold or bottom_fraction")
    if method != "clip":
        raise validation.FairBalanceError(f"method must be 'clip', not {method!r}")
    spec = embeddings.stored_model(samples, embeddings_field)
    if spec is None:
        raise validation.FairBalanceError(f"'{embeddings_field}' was not written by fairbalance; no model recorded")
    path = label_path(samples, label_field)
    gen = samples.match(Fv("generated") == True)  # noqa: E712
    real = samples.match(Fv("generated") != True)  # noqa: E712
    if len(gen) == 0:
        raise validation.FairBalanceError("The view has no generated samples")
    if texts is not None:
        texts = {str(c): t for c, t in texts.items()}
        lacking = sorted(set(gen.distinct(path)) - set(texts))
        empty = sorted(c for c, t in texts.items() if not (isinstance(t, str) and t.strip()))
        if lacking or empty:
            raise validation.FairBalanceError(
                "texts must give a non-empty text for every cluster of the generated samples; "
                f"missing: {lacking}, empty: {empty}")
    clip = models.load_clip(spec["model"], spec["pretrained"], device=device)
    new, _ = embeddings.compute_missing(gen, embeddings_field, clip, batch_size, progress=progress)
    run = runs.prepare(samples, run_key, "filter_generated", {
        "label_field": label_field, "embeddings_field": embeddings_field, "threshold": threshold,
        "bottom_fraction": bottom_fraction, "tag": tag, "model": spec, "score_method": method,
        "texts": sorted(texts.items()) if texts is not None else None},
        [score_field], overwrite)
    dataset = samples._root_dataset
    previous_tag = previous_tagged = None
    if dataset.has_run(run_key):
        previous_tag = runs.get_run_config(dataset, run_key).get("tag")
        previous_tagged = runs.load_run_results(dataset, run_key).get("tagged_ids")
    centroids = {}
    if texts is not None:
        names = sorted(texts)
        for c, vec in zip(names, clip.encode_text([texts[c] for c in names]).numpy()):
            centroids[c] = vec
    else:
        for c in real.distinct(path):
            _, emb, _ = embeddings.load(real.match(Fv(path) == c), embeddings_field)
            if len(emb):
                centroids[c] = embeddings.normalize(emb.mean(0, keepdims=True))[0]
    gids, glabels, gstored = gen.values(["id", path, embeddings_field])
    scores = {}
    for i, c, e in zip(gids, glabels, gstored):
        vec = new.get(i) if new.get(i) is not None else e
        if c in centroids and vec is not None:
            scores[i] = float(embeddings.normalize(np.asarray(vec)[None])[0] @ centroids[c])
    if not scores:
        raise validation.FairBalanceError("No generated sample has a cluster with real embeddings to compare to")
    values = np.array(list(scores.values()))
    cut = threshold if threshold is not None else float(np.quantile(values, bottom_fraction))
    low = [i for i, v in scores.items() if v < cut or (threshold is None and v <= cut)]

    def write():
        embeddings.write(gen, embeddings_field, new, clip)
        gen.select(list(scores)).set_values(score_field, scores, key_field="id")
        if previous_tag and previous_tagged:  # only what this run tagged before, never other samples
            samples._root_dataset.select(previous_tagged).untag_samples(previous_tag)
        samples.select(low).tag_samples(tag)

    run.write(write)
    result = {"num_scored": len(scores), "num_tagged": len(low), "cut": cut,
              "mean_score": float(values.mean())}
    run.save_results({**result, "tagged_ids": low})
    return result
