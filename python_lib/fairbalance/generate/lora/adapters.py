"""LoRA adapters of a diffusion model, one per group (or per cluster of a group): loading, saving, switching.

Basu et al., "Harnessing Diffusion-Generated Synthetic Images for Fair Image
Classification": fine-tune a diffusion model on the images of each group
(LoRA, DreamBooth), or on each cluster of a group's images with its own
token (Clustered DreamBooth), then generate the same number of images per
group. Adapters are ``peft`` LoRA layers (``LoraConfig``), several side by
side on one base model, switched per group while generating.

This module holds the adapters themselves, shared by the two steps:
base models, adding / saving / loading / switching adapters, their files
and the groups they stand for. Training them is
:mod:`fairbalance.generate.lora.finetune` (:func:`finetune_per_group`); generating
with them is :mod:`fairbalance.generate.lora.generation` (:func:`generate_per_group`).

Two kinds of base model: the project's class-conditional diffusion model
(:func:`fairbalance.train_conditional_diffusion`; groups are values of its
condition fields, e.g. class x attribute cells), or a Stable Diffusion
pipeline folder or hub id (users with the weights).

Adapters are saved with peft / diffusers utilities (``adapter_config.json`` +
safetensors for the conditional model, ``save_lora_weights`` for Stable
Diffusion), each folder with the fingerprint of its base model: loading them
onto another base model is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fairbalance.core import models, validation

METHODS = ("lora", "dreambooth")
MANIFEST_FILE = "fairbalance_adapters.json"  # written last: what loading looks for
ADAPTER_META_FILE = "fairbalance_adapter.json"
MIN_IMAGES_PER_GROUP = 5
PRIOR_STEPS = 25  # sampling steps of the prior-preservation images (Stable Diffusion dreambooth)
CONDITIONAL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")
SD_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PEFT_HINT = "pip install 'peft>=0.10' (a dependency of fairbalance; reinstall it with pip install -e .)"


def require_peft():
    """The ``peft`` module, or an ImportError that names the extra to install."""
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"Per-group LoRA / DreamBooth fine-tuning needs the 'peft' package: {PEFT_HINT}") from e
    return peft


# --------------------------------------------------------------------------- base models


@dataclass
class LoraBase:
    """A loaded base model: the project's conditional model or a Stable Diffusion pipeline."""

    kind: str  # "conditional" | "stable_diffusion"
    name: str  # the folder or hub id as recorded
    unet: torch.nn.Module
    fingerprint: str
    diff: object = None  # ConditionalDiffusionModel
    pipe: object = None  # StableDiffusionPipeline

    @property
    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.unet.named_parameters() if "lora_" not in n)


def base_kind(base_model: str) -> str:
    """``"conditional"`` or ``"stable_diffusion"``; a clear error for a folder that is neither."""
    from fairbalance.generate.diffusion_model import LABELS_FILE

    path = os.path.expanduser(os.fspath(base_model))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, LABELS_FILE)):
            return "conditional"
        index = os.path.join(path, "model_index.json")
        if not os.path.isfile(index):
            raise validation.FairBalanceError(
                f"base_model {path} is not a diffusers pipeline (no model_index.json) nor a model of "
                "train_conditional_diffusion (no fairbalance_labels.json)")
        with open(index) as f:
            cls = json.load(f).get("_class_name", "")
        if "StableDiffusion" not in cls or "XL" in cls:
            raise validation.FairBalanceError(
                f"base_model {path} holds a {cls or 'unknown'} pipeline; per-group adapters support "
                "StableDiffusionPipeline folders and models of train_conditional_diffusion")
        return "stable_diffusion"
    if os.path.sep in path and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise models.ModelNotFoundError(f"base_model folder does not exist: {path}")
    return "stable_diffusion"  # a hub id: loaded (from the local cache, or the hub) by fairbalance.core.models


def _fingerprint(unet: torch.nn.Module) -> str:
    """Identifies a base UNet by its config and a sample of its weights (LoRA layers excluded)."""
    h = hashlib.sha1(json.dumps(dict(unet.config), sort_keys=True, default=str).encode())
    state = {k: v for k, v in unet.state_dict().items() if "lora_" not in k}
    keys = sorted(state)
    for k in keys[:: max(1, len(keys) // 16)] + keys[-1:]:
        h.update(k.encode())
        # at fp16 precision: the same weights loaded in fp16 (inference on a GPU) or fp32 (training) agree
        h.update(state[k].detach().flatten()[:256].to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()


def load_base(base_model: str, device=None, for_training: bool = False) -> LoraBase:
    kind = base_kind(base_model)
    if kind == "conditional":
        from fairbalance.generate.diffusion_model import load_conditional_diffusion

        diff = load_conditional_diffusion(base_model, device)
        return LoraBase(kind, diff.folder, diff.unet, _fingerprint(diff.unet), diff=diff)
    kwargs = {"safety_checker": None, "requires_safety_checker": False}
    # LoRA layers are trained in fp32 (mixed fp16 base weights are for inference)
    pipe = _fresh_pipeline(base_model, device, torch.float32 if for_training else None, **kwargs)
    return LoraBase(kind, os.fspath(base_model), pipe.unet, _fingerprint(pipe.unet), pipe=pipe)


def _fresh_pipeline(base_model, device, dtype, **kwargs):
    """A pipeline of our own (the per-process cache is shared; adapters must not leak into it)."""
    import copy

    pipe = models.load_diffusion_pipeline(base_model, device=device, dtype=dtype, **kwargs)
    spec = getattr(pipe, "fairbalance_spec", None)
    pipe = copy.copy(pipe)
    pipe.unet = copy.deepcopy(pipe.unet)
    pipe.fairbalance_spec = spec
    return pipe


def _lora_layers(unet):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def activate(unet, name: str | None) -> None:
    """Make adapter ``name`` the only active one (None: the base model alone)."""
    for layer in _lora_layers(unet):
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)


def add_adapter(base: LoraBase, name: str, rank: int) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(CONDITIONAL_TARGETS if base.kind == "conditional" else SD_TARGETS)
    cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    with warnings.catch_warnings():  # peft warns that several adapters share the model: that is the design
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        if base.kind == "stable_diffusion":
            base.unet.add_adapter(cfg, adapter_name=name)  # diffusers' PeftAdapterMixin
        else:
            inject_adapter_in_model(cfg, base.unet, adapter_name=name)
    activate(base.unet, name)


def save_adapter(base: LoraBase, name: str, folder: str, meta: dict) -> int:
    """The adapter's weights (+ config) and its metadata, written to a temp folder renamed into place."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        with validation.disk_write(f"the adapter of group {name!r}", os.path.dirname(folder)):
            return _write_adapter(base, name, folder, tmp, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # renamed into place on success; a failed write's half is removed


def _write_adapter(base: LoraBase, name: str, folder: str, tmp: str, meta: dict) -> int:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(base.unet, adapter_name=name)
    if base.kind == "stable_diffusion":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(state))
    else:
        base.unet.peft_config[name].save_pretrained(tmp)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()},
                  os.path.join(tmp, "adapter_model.safetensors"))
    size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    with open(os.path.join(tmp, ADAPTER_META_FILE), "w") as f:
        json.dump({**meta, "adapter_bytes": size}, f, indent=1)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return size


def _load_adapter(base: LoraBase, name: str, folder: str) -> None:
    if base.kind == "stable_diffusion":
        base.pipe.load_lora_weights(folder, adapter_name=name)
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        inject_adapter_in_model(cfg, base.unet, adapter_name=name)
    result = set_peft_model_state_dict(base.unet, load_file(os.path.join(folder, "adapter_model.safetensors")),
                                       adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise validation.FairBalanceError(f"The adapter in {folder} does not fit this base model "
                                          f"({len(result.unexpected_keys)} unexpected weights)")


def delete_adapter(base: LoraBase, name: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in base.unet.modules():
        if isinstance(layer, BaseTunerLayer) and name in layer.lora_A:
            layer.delete_adapter(name)
    getattr(base.unet, "peft_config", {}).pop(name, None)


def read_meta(folder: str) -> dict | None:
    path = os.path.join(folder, ADAPTER_META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- groups and clusters


def group_fields(group_field) -> list[str]:
    fields = [group_field] if isinstance(group_field, str) else list(group_field or [])
    if not fields or not all(isinstance(f, str) and f for f in fields) or len(set(fields)) != len(fields):
        raise validation.FairBalanceError(
            f"group_field must be a field name or a list of distinct field names, got {group_field!r}")
    return fields


def group_key(values) -> str:
    return "|".join(str(v) for v in values)


def real_groups(samples, fields: list[str]):
    """Real (non-generated) samples having every group field: ids, files, group keys, values; skipped count."""
    from fiftyone import ViewField as Fv

    from fairbalance.core.fields import label_path

    real = samples.match(Fv("generated") != True) if samples._root_dataset.has_field("generated") else samples  # noqa
    cols = real.values(["id", "filepath"] + [label_path(samples, f) for f in fields])
    ids, paths, vals = cols[0], cols[1], list(zip(*cols[2:]))
    keep = [j for j, v in enumerate(vals) if all(x is not None for x in v)]
    values = [tuple(str(x) for x in vals[j]) for j in keep]
    return [ids[j] for j in keep], [paths[j] for j in keep], values, len(ids) - len(keep)


def cluster_features(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means cluster of each row (fewer clusters when there are fewer rows)."""
    k = min(k, len(x))
    if k <= 1:
        return np.zeros(len(x), dtype=int)
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)


def model_condition(diff, values: dict) -> tuple[int, ...] | None:
    """The conditional model's (class[, attribute]) indices for a group's field values (None: not known)."""
    fields = [diff.label_field] + ([diff.attribute_field] if diff.attribute_field else [])
    tables = [diff.classes] + ([diff.attributes] if diff.attribute_field else [])
    out = []
    for f, table in zip(fields, tables):
        if values.get(f) not in table:
            return None
        out.append(table.index(values[f]))
    return tuple(out)


# --------------------------------------------------------------------------- loading adapters


@dataclass
class GroupAdapters:
    """A base model with its per-group adapters loaded side by side (switch with :meth:`use`)."""

    base: LoraBase
    folder: str
    config: dict
    adapters: list[dict]

    def use(self, name: str | None) -> None:
        activate(self.base.unet, name)

    def by_group(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for a in self.adapters:
            out.setdefault(a["group"], []).append(a)
        return out

    @classmethod
    def from_pretrained(cls, folder: str, device=None, base_model=None) -> "GroupAdapters":
        """Read a folder written by :func:`finetune_per_group` (its manifest, then each adapter onto the base)."""
        manifest = os.path.join(folder, MANIFEST_FILE)

        def read():
            with open(manifest) as f:
                return json.load(f)

        saved = models.load_or_explain("per-group adapters manifest", manifest, read)
        if not saved.get("complete"):
            raise models.ModelNotFoundError(f"The adapters in {folder} are incomplete (fine-tuning was interrupted "
                                            "or is running); run finetune_per_group again to finish them")
        cfg = saved["config"]
        base = load_base(base_model if base_model is not None else cfg["base_model"], device)
        adapters = []
        for a in saved["adapters"]:
            path = os.path.join(folder, a["name"])
            meta = read_meta(path)
            if meta is None:
                raise models.ModelNotFoundError(
                    f"Adapter {path} is missing or incomplete; run finetune_per_group again")
            if meta.get("base_fingerprint") != base.fingerprint:
                raise validation.FairBalanceError(
                    f"The adapters in {folder} were trained on another base model ({cfg['base_model']}, "
                    f"fingerprint {str(meta.get('base_fingerprint'))[:10]}) than {base.name} (fingerprint "
                    f"{base.fingerprint[:10]}); they cannot be loaded onto it")
            models.load_or_explain("LoRA adapter", path, lambda: _load_adapter(base, meta["name"], path))
            adapters.append({**meta, "folder": path})
        activate(base.unet, None)
        return cls(base, os.path.abspath(folder), cfg, adapters)


def load_group_adapters(adapters_dir, base_model=None, device=None) -> GroupAdapters:
    """Load every adapter of a :func:`finetune_per_group` folder onto its base model (or ``base_model``).

    Adapters trained on another base model (another fingerprint) are refused.
    """
    require_peft()
    return models.load_saved(GROUP_ADAPTERS.name, adapters_dir, device, base_model=base_model)


GROUP_ADAPTERS = models.register_saved_family(models.SavedFamily(
    "per-group adapters", GroupAdapters, MANIFEST_FILE, GroupAdapters.from_pretrained,
    "finetune_per_group", "output_dir"))
