"""The classifier model: its config, backbones, checkpoint (save/load) and prediction.

:mod:`fairbalance.train.training` trains it (the recipes); this module is what a trained classifier is
and how it is rebuilt and run, so loading or predicting needs none of the recipes.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from fairbalance.core import images, models, validation
from fairbalance.core.data import image_transform

METHODS = ("vanilla", "biased", "jtt", "lff", "synthetic", "two_stage", "group_dro", "dfr")
GENERATED_METHODS = ("synthetic", "two_stage")  # the methods that train on generated samples
GENERATED_OPTION_METHODS = ("lff", "jtt")  # the methods that do with use_generated=True
BACKBONES = ("auto", "resnet18", "cnn", "mlp")
NORMALIZATIONS = ("none", "dataset", "imagenet")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION_RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ImageNet-1K checkpoint name
AUTO_MLP_MAX_SIDE = 32  # backbone="auto": LfF's MLP up to this size (Colored MNIST), ResNet-18 above


def check_use_generated(method: str, use_generated) -> None:
    """``use_generated`` is a bool, and only for the methods that take it."""
    if validation.require_bool("use_generated", use_generated) and method not in GENERATED_OPTION_METHODS:
        raise validation.FairBalanceError(
            f"use_generated is for method {' or '.join(map(repr, GENERATED_OPTION_METHODS))}, not {method!r} "
            "('synthetic' and 'two_stage' always train on generated samples; 'synthetic' is vanilla on real + "
            "generated)")


def trains_on_generated(config) -> bool:
    """Whether ``config``'s method trains on the generated samples of the view."""
    return config.method in GENERATED_METHODS or bool(config.use_generated)


def check_refit_head(method: str, refit_head) -> None:
    """``refit_head`` is a bool, and not for the methods that refit already or learn the bias on purpose."""
    if validation.require_bool("refit_head", refit_head) and method in ("dfr", "biased"):
        raise validation.FairBalanceError(
            "refit_head=True refits the last layer after a debiasing method; "
            + ("method='dfr' always does" if method == "dfr" else "method='biased' learns the bias on purpose"))


@dataclass
class TrainConfig:
    """Everything that determines a trained classifier; stored with the checkpoint and the run.

    The one source of the classifier's hyperparameters and their defaults: the trainer takes one,
    :func:`fairbalance.train_classifier` reads its keyword defaults from these fields
    (``epochs: int = TrainConfig.epochs``), and the biased models of hardness and discovery are one
    (:data:`fairbalance.tag.hardness.BIASED_MODEL`). The trainer resolves ``classes`` (None),
    ``image_size`` (None) and ``backbone`` (``auto``) from the data, and sets the :data:`RESOLVED` fields.
    """

    label_field: str = "ground_truth"
    classes: list[str] | None = None  # None: the label field's classes in the view (set while training)
    method: str = "vanilla"
    backbone: str = "auto"
    pretrained: bool = False
    image_size: list[int] | None = None  # [height, width]; None = the images' native size
    normalize: str = "none"
    mean: list[float] | None = None
    std: list[float] | None = None
    q: float = 0.7
    ema: float = 0.7
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    weight_field: str | None = None
    hard_tag: str | None = None
    upweight: float = 50.0
    synthetic_weight: float = 1.0
    max_synthetic_fraction: float | None = None
    model_selection: str = "last_epoch"
    num_workers: int = 0
    pretrained_weights: str | None = None
    supcon_weight: float = 1.0
    supcon_temperature: float = 0.1
    projection_dim: int = 128
    head_epochs: int = 20
    stage1_real: bool = False
    exclude_field: str | None = "filtered_out"
    group_field: str | None = None  # group_dro / dfr: groups are (class, this field's value)
    dro_step: float = 0.01
    refit_head: bool = False  # after training, the last layer refitted on val_samples as DFR's (train.group_robust)
    use_generated: bool = False  # lff / jtt: the generated samples that carry the label train too (as synthetic's)
    groups: list[str] | None = None  # the group names trained on (set while training)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise validation.FairBalanceError(f"method must be one of {METHODS}, not {self.method!r}")
        if self.backbone not in BACKBONES:
            raise validation.FairBalanceError(f"backbone must be one of {BACKBONES}, not {self.backbone!r}")
        if self.normalize not in NORMALIZATIONS:
            raise validation.FairBalanceError(f"normalize must be one of {NORMALIZATIONS}, not {self.normalize!r}")
        if not (isinstance(self.q, (int, float)) and 0 < self.q <= 1):
            raise validation.FairBalanceError(f"q must be in (0, 1], got {self.q!r}")
        if not (isinstance(self.ema, (int, float)) and 0 <= self.ema < 1):
            raise validation.FairBalanceError(f"ema must be in [0, 1), got {self.ema!r}")
        for name in ("epochs", "batch_size"):
            validation.require_positive_int(name, getattr(self, name))
        validation.require_seed(self.seed)
        for name in ("lr", "upweight", "synthetic_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise validation.FairBalanceError(f"{name} must be a finite number > 0, got {value!r}")
        if not (np.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise validation.FairBalanceError("weight_decay must be a finite number >= 0")
        cap = self.max_synthetic_fraction
        if cap is not None and not (isinstance(cap, (int, float)) and 0 < cap <= 10):
            raise validation.FairBalanceError("max_synthetic_fraction must be in (0, 10] (synthetic per real sample)")
        if self.method == "jtt" and not self.hard_tag:
            raise validation.FairBalanceError("method='jtt' needs hard_tag: the tag of compute_hardness_tags")
        if self.hard_tag:
            validation.require_tag("hard_tag", self.hard_tag)
        if self.method != "jtt" and self.hard_tag:
            raise validation.FairBalanceError(f"hard_tag is used by method='jtt' only, not {self.method!r}")
        if len(self.classes) < 2:
            raise validation.FairBalanceError(
                f"'{self.label_field}' has {len(self.classes)} class(es) in this view; a classifier needs at least 2"
            )
        for name in ("supcon_temperature",):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise validation.FairBalanceError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.supcon_weight, (int, float)) and np.isfinite(self.supcon_weight)
                and self.supcon_weight >= 0):
            raise validation.FairBalanceError(f"supcon_weight must be a finite number >= 0, got {self.supcon_weight!r}")
        for name in ("projection_dim", "head_epochs"):
            validation.require_positive_int(name, getattr(self, name))
        validation.require_bool("stage1_real", self.stage1_real)
        if self.exclude_field is not None:
            validation.require_field_name(self.exclude_field)
        check_use_generated(self.method, self.use_generated)
        check_refit_head(self.method, self.refit_head)

    @classmethod
    def from_arguments(cls, arguments: dict, **overrides) -> "TrainConfig":
        """The config of a call's arguments (e.g. a writer's ``locals()``): its fields, the rest ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in {**arguments, **overrides}.items() if k in names})

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainConfig":
        """A stored config (checkpoint or run): a field an older version did not store takes its default."""
        return cls.from_arguments(saved)

    def settings(self) -> dict:
        """The fields a user sets (not those the trainer resolves from the data)."""
        return {k: v for k, v in asdict(self).items() if k not in RESOLVED}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, int(self.image_size[0]), int(self.image_size[1]))


# what the trainer sets from the data and the training: never a user's setting
RESOLVED = ("classes", "mean", "std", "model_selection", "pretrained_weights", "groups")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model, so a saved model normalises its own inputs."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def resolve_backbone(name: str, image_size: Sequence[int]) -> str:
    """``auto``: LfF's MLP for small images (<= 32 px, Colored MNIST), ResNet-18 otherwise."""
    if name != "auto":
        return name
    return "mlp" if max(image_size) <= AUTO_MLP_MAX_SIDE else "resnet18"


def resnet18_weights() -> str:
    """torchvision's ImageNet ResNet-18 checkpoint on disk; a clear error when it is not there (never a random start)."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", TORCHVISION_RESNET18_FILE)
    if not os.path.isfile(path):
        raise models.ModelNotFoundError(
            f"pretrained=True: torchvision's ImageNet ResNet-18 weights are not on disk ({path}). Download them "
            "once with torchvision.models.resnet18(weights='IMAGENET1K_V1') on a machine with network access "
            "and copy the file there, or pass pretrained=False to train from random weights."
        )
    return path


def build_backbone(name: str, num_classes: int, input_shape: Sequence[int], pretrained: bool = False
                   ) -> tuple[nn.Module, str | None]:
    """A torchvision ResNet-18 (ImageNet weights with ``pretrained``), a small CNN, or LfF's 3x100 MLP.

    ``pretrained=True`` without the weights on disk is an error, never a silent random start.
    """
    if pretrained and name != "resnet18":
        raise validation.FairBalanceError(f"pretrained weights exist only for backbone 'resnet18', not {name!r}")
    if name == "mlp":
        d = int(np.prod(input_shape))
        return nn.Sequential(nn.Flatten(), nn.Linear(d, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                             nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, num_classes)), None
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(128, num_classes),
        ), None
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    source = None
    if pretrained:
        source = resnet18_weights()
        net.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net, source


def build_model(config: TrainConfig) -> tuple[nn.Module, str | None]:
    """Normalisation (when configured) + backbone, as trained and as loaded."""
    net, source = build_backbone(config.backbone, len(config.classes), config.input_shape, config.pretrained)
    if config.mean is not None:
        net = nn.Sequential(Normalize(config.mean, config.std), net)
    return net, source


@dataclass
class TrainedClassifier:
    """A trained model with its classes and config (save/load with :meth:`save` / :func:`load_classifier`)."""

    model: nn.Module
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    num_skipped: int = 0
    num_generated_used: int = 0
    num_generated_excluded: int = 0
    best_epoch: int | None = None
    num_filtered_out: int = 0  # generated samples left out because exclude_field marks them
    run_key: str | None = None  # the run that recorded this training (None: not recorded)
    checkpoint: str | None = None  # the folder it was saved to

    @property
    def classes(self) -> list[str]:
        return self.config.classes

    def to_dict(self) -> dict:
        """The training's figures and config (not the weights)."""
        return {"run_key": self.run_key, "checkpoint": self.checkpoint, "config": asdict(self.config),
                "history": self.history, "best_epoch": self.best_epoch, "num_skipped": self.num_skipped,
                "num_generated_used": self.num_generated_used,
                "num_generated_excluded": self.num_generated_excluded, "num_filtered_out": self.num_filtered_out}

    @classmethod
    def from_pretrained(cls, folder: str, device=None) -> "TrainedClassifier":
        """Read a folder written by :meth:`save_pretrained` (on the CPU; :func:`load_classifier` checks it first)."""
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        config = TrainConfig.from_dict(saved["config"])
        net, _ = build_model(replace(config, pretrained=False))
        net.load_state_dict(torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True))
        return cls(net.eval(), config, saved.get("history", []), best_epoch=saved.get("best_epoch"),
                   checkpoint=os.path.abspath(folder))

    def save_pretrained(self, folder: str) -> str:
        """Write ``model.pt`` and ``config.json`` atomically (temp file + rename, config last)."""
        os.makedirs(folder, exist_ok=True)
        tmps = [os.path.join(folder, "model.pt.tmp"), os.path.join(folder, "config.json.tmp")]
        try:
            with validation.disk_write("the classifier", folder):
                buffer = io.BytesIO()  # serialised in memory, written with plain file I/O: a full disk is an OSError
                torch.save(self.model.state_dict(), buffer)
                with open(tmps[0], "wb") as f:
                    f.write(buffer.getbuffer())
                os.replace(tmps[0], os.path.join(folder, "model.pt"))
                with open(tmps[1], "w") as f:
                    json.dump({"config": asdict(self.config), "history": self.history,
                               "best_epoch": self.best_epoch}, f, indent=1)
                os.replace(tmps[1], os.path.join(folder, "config.json"))
        except BaseException:
            for tmp in tmps:  # a failed write leaves no half-written temp file
                if os.path.exists(tmp):
                    os.remove(tmp)
            raise
        return folder

    save = save_pretrained  # its name before the from_pretrained/save_pretrained pair


def load_classifier(folder: str) -> TrainedClassifier:
    """Load a classifier saved by :meth:`TrainedClassifier.save_pretrained` (:func:`models.load_saved`)."""
    return models.load_saved(CLASSIFIER.name, folder)


CLASSIFIER = models.register_saved_family(models.SavedFamily(
    "classifier", TrainedClassifier, "config.json", TrainedClassifier.from_pretrained,
    "train_classifier", "checkpoint"))


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


_channel_stats = channel_stats  # its name before it was public


class _ResNetFeatures(nn.Module):
    """A torchvision ResNet up to its pooled features (the ``fc`` head left out); shares its modules."""

    def __init__(self, resnet):
        super().__init__()
        self.resnet = resnet

    def forward(self, x):
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))
        return torch.flatten(r.avgpool(x), 1)


def split_encoder_head(net: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The model as (encoder, linear head) sharing its parameters: what two-stage training trains separately."""
    norm, body = (net[0], net[1]) if isinstance(net, nn.Sequential) and isinstance(net[0], Normalize) else (None, net)
    if isinstance(body, nn.Sequential):
        encoder, head = nn.Sequential(*list(body)[:-1]), body[-1]
    else:
        encoder, head = _ResNetFeatures(body), body.fc
    if norm is not None:
        encoder = nn.Sequential(norm, encoder)
    return encoder, head


@torch.inference_mode()
def predict(classifier: TrainedClassifier, filepaths: Sequence[str], device=None, batch_size: int = 256,
            num_workers: int = 0, progress=None) -> torch.Tensor:
    """Logits for image files (eval mode, no augmentation; the model normalises its inputs)."""
    import fiftyone.core.utils as fou

    dev = models.resolve_device(device)
    net = classifier.model.to(dev).eval()
    out = torch.empty(len(filepaths), len(classifier.classes))
    with fou.ProgressBar(total=len(filepaths), progress=progress) as pb:
        for idx, batch in images.iter_batches(filepaths, image_transform(classifier.config.image_size), batch_size,
                                              num_workers):
            with torch.inference_mode(), torch.autocast(dev.type, enabled=dev.type == "cuda"):
                out[idx] = net(batch.to(dev)).float().cpu()
            pb.update(len(idx))
    return out
