"""The conditional diffusion model: its configuration, the factorised condition, the UNet, saving and loading.

Training it: :mod:`fairbalance.generate.diffusion`; sampling it: :mod:`fairbalance.generate.diffusion_sampling`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from fairbalance.core import models

LABELS_FILE = "fairbalance_labels.json"
CONDITION_FILE = "condition.safetensors"


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


def build_model(cfg: DiffusionTrainConfig) -> ConditionalUNet:
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


def save_model(folder: str, model: ConditionalUNet, scheduler, cfg: DiffusionTrainConfig, step: int) -> None:
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

    @classmethod
    def from_pretrained(cls, folder: str, device=None) -> "ConditionalDiffusionModel":
        """Read a folder written by :func:`save_model` (the UNet, condition tables, scheduler config, labels)."""
        from diffusers import DDPMScheduler, UNet2DModel
        from safetensors.torch import load_file

        with open(os.path.join(folder, LABELS_FILE)) as f:
            meta = json.load(f)
        saved = meta["config"]
        cfg = DiffusionTrainConfig(**{**saved, "block_out_channels": tuple(saved["block_out_channels"])})
        unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet"))
        condition = FactorisedCondition(cfg.factor_sizes, cfg.block_out_channels[0] * 4)
        condition.load_state_dict(load_file(os.path.join(folder, CONDITION_FILE)))
        DDPMScheduler.load_config(os.path.join(folder, "scheduler"))  # read when sampling: checked before any write
        model = ConditionalUNet(unet, condition).to(models.resolve_device(device)).eval()
        return cls(model, meta["classes"], meta.get("attributes"), meta["config"], os.path.abspath(folder),
                   int(meta.get("step", 0)))


def load_conditional_diffusion(folder: str, device=None) -> ConditionalDiffusionModel:
    """Load a model saved by :func:`train_conditional_diffusion` (:func:`models.load_saved`)."""
    return models.load_saved(CONDITIONAL_DIFFUSION.name, folder, device)


CONDITIONAL_DIFFUSION = models.register_saved_family(models.SavedFamily(
    "conditional diffusion model", ConditionalDiffusionModel, LABELS_FILE, ConditionalDiffusionModel.from_pretrained,
    "conditional_diffusion", "model_dir"))
