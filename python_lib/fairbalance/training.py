"""Image classifiers on FiftyOne views: vanilla (CE), biased (GCE) and debiased (JTT-style).

Generalized Cross Entropy (Zhang & Sabuncu 2018), as used by LfF/DiffuBias to
train a deliberately *biased* model: ``L = (1 - p_y^q) / q``; its gradient is
``p_y^q * grad CE``, so easy (bias-aligned) samples dominate. ``q -> 0`` is CE.

Debiased training reweights samples: a per-sample weight field, or the JTT
rule (upweight the samples of a "hard" tag by ``lambda``), either in the loss
(``mode="upweight"``) or by sampling with replacement (``mode="oversample"``).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fairbalance import images, models, validation

BACKBONES = ("resnet18", "cnn", "mlp")
TORCHVISION_RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's ImageNet-1K checkpoint name


def gce_loss(logits: torch.Tensor, targets: torch.Tensor, q: float = 0.7) -> torch.Tensor:
    """Per-sample Generalized Cross Entropy ``(1 - p_y^q) / q``."""
    if not 0 < q <= 1:
        raise ValueError("q must be in (0, 1]")
    p_y = F.softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1).clamp_min(1e-8)
    return (1.0 - p_y.pow(q)) / q


@dataclass
class TrainConfig:
    """Everything that determines a trained classifier; stored with the checkpoint and the run."""

    label_field: str
    classes: list[str]
    backbone: str = "resnet18"
    pretrained: bool = True
    image_size: int = 32
    loss: str = "ce"
    q: float = 0.7
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    weight_field: str | None = None
    hard_tag: str | None = None
    upweight: float = 1.0
    mode: str = "upweight"
    num_workers: int = 0
    pretrained_weights: str | None = None

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise validation.FairBalanceError(f"backbone must be one of {BACKBONES}")
        if self.loss not in ("ce", "gce"):
            raise validation.FairBalanceError("loss must be 'ce' or 'gce'")
        if self.mode not in ("upweight", "oversample"):
            raise validation.FairBalanceError("mode must be 'upweight' or 'oversample'")
        if not 0 < self.q <= 1:
            raise validation.FairBalanceError("q must be in (0, 1]")
        for name in ("epochs", "batch_size", "image_size"):
            validation.require_positive_int(name, getattr(self, name))
        if self.upweight <= 0:
            raise validation.FairBalanceError("upweight must be > 0")
        if len(self.classes) < 2:
            raise validation.FairBalanceError(
                f"'{self.label_field}' has {len(self.classes)} class(es) in this view; a classifier needs at least 2"
            )


def build_backbone(name: str, num_classes: int, image_size: int, pretrained: bool = True) -> tuple[nn.Module, str | None]:
    """A torchvision ResNet-18 (ImageNet weights if on disk), a small CNN, or LfF's 3x100 MLP."""
    if name == "mlp":
        d = 3 * image_size * image_size
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
        path = os.path.join(torch.hub.get_dir(), "checkpoints", TORCHVISION_RESNET18_FILE)
        if os.path.isfile(path):
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            source = path
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net, source


class _Tensors(torch.utils.data.Dataset):
    def __init__(self, x, y, w):
        self.x, self.y, self.w = x, y, w

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.w[i], i


def image_transform(image_size: int):
    """Resize + tensor + [-1, 1] normalisation; no augmentation (the bias must stay visible)."""
    import torchvision.transforms as T

    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])


def load_images(filepaths: Sequence[str], image_size: int, num_workers: int = 0, progress=None) -> torch.Tensor:
    """All images of a view as one float tensor (n x 3 x s x s); errors name the bad files."""
    import fiftyone.core.utils as fou

    out = torch.empty(len(filepaths), 3, image_size, image_size)
    with fou.ProgressBar(total=len(filepaths), progress=progress) as pb:
        for idx, batch in images.iter_batches(filepaths, image_transform(image_size), batch_size=256,
                                              num_workers=num_workers):
            out[idx] = batch
            pb.update(len(idx))
    return out


def _labels(samples, label_field: str, classes: list[str] | None):
    """(ids, filepaths, class indices) of the samples that have a label; raise when none do."""
    from fairbalance.balance import label_path

    path = label_path(samples, label_field)
    ids, paths, labels = samples.values(["id", "filepath", path])
    keep = [j for j, l in enumerate(labels) if l is not None]
    if not keep:
        raise validation.FairBalanceError(f"No sample in the view has a '{label_field}' label")
    labels = [str(labels[j]) for j in keep]
    if classes is None:
        classes = sorted(set(labels), key=lambda c: (0, int(c)) if c.lstrip("-").isdigit() else (1, c))
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise validation.FairBalanceError(f"Labels {unknown} are not among the classes {classes}")
    index = {c: i for i, c in enumerate(classes)}
    return ([ids[j] for j in keep], [paths[j] for j in keep], np.array([index[l] for l in labels]),
            classes, len(ids) - len(keep))


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass
class TrainedClassifier:
    """A trained model with its classes and config (save/load with :meth:`save` / :func:`load_classifier`)."""

    model: nn.Module
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    num_skipped: int = 0

    @property
    def classes(self) -> list[str]:
        return self.config.classes

    def save(self, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        torch.save(self.model.state_dict(), os.path.join(folder, "model.pt"))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"config": asdict(self.config), "history": self.history}, f, indent=1)
        return folder


def load_classifier(folder: str) -> TrainedClassifier:
    """Load a classifier saved by :meth:`TrainedClassifier.save`."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise models.ModelNotFoundError(f"No classifier checkpoint in {folder} (config.json missing)")
    with open(cfg_path) as f:
        saved = json.load(f)
    config = TrainConfig(**saved["config"])
    net, _ = build_backbone(config.backbone, len(config.classes), config.image_size, pretrained=False)
    net.load_state_dict(torch.load(os.path.join(folder, "model.pt"), map_location="cpu", weights_only=True))
    return TrainedClassifier(net.eval(), config, saved.get("history", []))


def _sample_weights(samples, ids, config: TrainConfig) -> np.ndarray:
    w = np.ones(len(ids), dtype=np.float64)
    if config.weight_field:
        validation.require_fields(samples, [config.weight_field])
        by_id = dict(zip(*samples.values(["id", config.weight_field])))
        w *= np.array([1.0 if by_id.get(i) is None else float(by_id[i]) for i in ids])
        if np.any(w < 0) or not np.all(np.isfinite(w)):
            raise validation.FairBalanceError(f"'{config.weight_field}' must hold finite non-negative weights")
    if config.hard_tag:
        hard = set(samples.match_tags(config.hard_tag).values("id"))
        if not hard:
            raise validation.FairBalanceError(f"No sample of the view is tagged '{config.hard_tag}'")
        w *= np.array([config.upweight if i in hard else 1.0 for i in ids])
    return w


def train_classifier(
    samples,
    label_field: str = "ground_truth",
    classes: list[str] | None = None,
    loss: str = "ce",
    q: float = 0.7,
    backbone: str = "resnet18",
    pretrained: bool = True,
    image_size: int = 32,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    weight_field: str | None = None,
    hard_tag: str | None = None,
    upweight: float = 1.0,
    mode: str = "upweight",
    seed: int = 0,
    device: str | None = None,
    num_workers: int = 0,
    progress=None,
) -> TrainedClassifier:
    """Train an image classifier on ``samples`` (vanilla CE, biased GCE, or reweighted).

    Samples without a label are skipped (counted in ``num_skipped``).
    Deterministic for a given seed on the CPU; AMP on CUDA.
    """
    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    ids, paths, y, classes, skipped = _labels(samples, label_field, classes)
    config = TrainConfig(label_field, classes, backbone, pretrained, image_size, loss, q, epochs, batch_size, lr,
                         weight_decay, seed, weight_field, hard_tag, upweight, mode, num_workers)
    config.validate()
    if len(set(y.tolist())) < 2:
        raise validation.FairBalanceError(f"Only one class of '{label_field}' is present in this view")
    weights = _sample_weights(samples, ids, config)
    dev = models.resolve_device(device)
    gen = seed_everything(seed)
    x = load_images(paths, image_size, num_workers=num_workers, progress=False)
    net, source = build_backbone(backbone, len(classes), image_size, pretrained)
    config.pretrained_weights = source
    net = net.to(dev)
    data = _Tensors(x, torch.as_tensor(y), torch.as_tensor(weights, dtype=torch.float32))
    if mode == "oversample" and (hard_tag or weight_field):
        sampler = torch.utils.data.WeightedRandomSampler(weights, num_samples=len(weights), replacement=True,
                                                         generator=gen)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=sampler)
        use_weights = False
    else:
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)
        use_weights = hard_tag is not None or weight_field is not None
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    history = []
    import fiftyone.core.utils as fou

    with fou.ProgressBar(total=epochs, progress=progress) as pb:
        for epoch in range(epochs):
            net.train()
            total, count, correct = 0.0, 0, 0
            for xb, yb, wb, _ in loader:
                xb, yb, wb = xb.to(dev), yb.to(dev), wb.to(dev)
                with torch.autocast(dev.type, enabled=dev.type == "cuda"):
                    logits = net(xb)
                    per = gce_loss(logits.float(), yb, q) if loss == "gce" else F.cross_entropy(
                        logits.float(), yb, reduction="none")
                    batch_loss = (per * wb).sum() / wb.sum() if use_weights else per.mean()
                opt.zero_grad(set_to_none=True)
                scaler.scale(batch_loss).backward()
                scaler.step(opt)
                scaler.update()
                total += float(per.detach().sum())
                count += len(yb)
                correct += int((logits.argmax(1) == yb).sum())
            history.append({"epoch": epoch + 1, "loss": total / count, "train_accuracy": correct / count})
            pb.update()
    return TrainedClassifier(net.eval(), config, history, skipped)


@torch.inference_mode()
def predict(classifier: TrainedClassifier, filepaths: Sequence[str], device=None, batch_size: int = 256,
            num_workers: int = 0) -> torch.Tensor:
    """Logits for image files (eval mode, no augmentation)."""
    dev = models.resolve_device(device)
    net = classifier.model.to(dev).eval()
    out = torch.empty(len(filepaths), len(classifier.classes))
    for idx, batch in images.iter_batches(filepaths, image_transform(classifier.config.image_size), batch_size,
                                          num_workers):
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            out[idx] = net(batch.to(dev)).float().cpu()
    return out
