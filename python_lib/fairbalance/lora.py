"""One LoRA adapter per group (or per cluster of a group) of a diffusion model, and group-balanced generation.

Basu et al., "Harnessing Diffusion-Generated Synthetic Images for Fair Image
Classification": fine-tune a diffusion model on the images of each group
(LoRA, DreamBooth), or on each cluster of a group's images with its own
token (Clustered DreamBooth), then generate the same number of images per
group. Adapters are ``peft`` LoRA layers (``LoraConfig``), several side by
side on one base model, switched per group while generating.

Two kinds of base model:

- the project's class-conditional diffusion model
  (:func:`fairbalance.train_conditional_diffusion`; groups are values of its
  condition fields, e.g. class x attribute cells): ``method="lora"``
  fine-tunes the adapter under each group's own condition, so guidance keeps
  working; ``method="dreambooth"`` under the null condition, so the adapter
  alone stands for the group (its "token");
- a Stable Diffusion pipeline folder or hub id (users with the weights):
  ``method="lora"`` prompts with the group's name, ``"dreambooth"`` with a
  rare token per adapter (``"a photo of sks1 person"``), prior preservation
  optional (``prior_loss_weight``: images of the prompt without the token,
  drawn from the base pipeline, keep their loss).

Adapters are saved with peft / diffusers utilities (``adapter_config.json`` +
safetensors for the conditional model, ``save_lora_weights`` for Stable
Diffusion), each folder with the fingerprint of its base model: loading them
onto another base model is refused. What to generate goes through the one
shared loop of :mod:`fairbalance.generation`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance import config as fb_config
from fairbalance import claims, distributed, models, runs, training, validation
from fairbalance.generation import (GenerationJob, GenerationResult, finish_generation, plan_counts, run_generation,
                                    start_generation)

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
class _Base:
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
    from fairbalance.diffusion import LABELS_FILE

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
    return "stable_diffusion"  # a hub id: loaded (from the local cache, or the hub) by fairbalance.models


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


def _load_base(base_model: str, device=None, for_training: bool = False) -> _Base:
    kind = base_kind(base_model)
    if kind == "conditional":
        from fairbalance.diffusion import load_conditional_diffusion

        diff = load_conditional_diffusion(base_model, device)
        return _Base(kind, diff.folder, diff.unet, _fingerprint(diff.unet), diff=diff)
    kwargs = {"safety_checker": None, "requires_safety_checker": False}
    # LoRA layers are trained in fp32 (mixed fp16 base weights are for inference)
    pipe = _fresh_pipeline(base_model, device, torch.float32 if for_training else None, **kwargs)
    return _Base(kind, os.fspath(base_model), pipe.unet, _fingerprint(pipe.unet), pipe=pipe)


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


def _add_adapter(base: _Base, name: str, rank: int) -> None:
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


def _save_adapter(base: _Base, name: str, folder: str, meta: dict) -> int:
    """The adapter's weights (+ config) and its metadata, written to a temp folder renamed into place."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
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


def _load_adapter(base: _Base, name: str, folder: str) -> None:
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


# --------------------------------------------------------------------------- groups and clusters


def _group_fields(group_field) -> list[str]:
    fields = [group_field] if isinstance(group_field, str) else list(group_field or [])
    if not fields or not all(isinstance(f, str) and f for f in fields) or len(set(fields)) != len(fields):
        raise validation.FairBalanceError(
            f"group_field must be a field name or a list of distinct field names, got {group_field!r}")
    return fields


def group_key(values) -> str:
    return "|".join(str(v) for v in values)


def _real_groups(samples, fields: list[str]):
    """Real (non-generated) samples having every group field: ids, files, group keys, values; skipped count."""
    from fiftyone import ViewField as Fv

    from fairbalance.balance import label_path

    real = samples.match(Fv("generated") != True) if samples._root_dataset.has_field("generated") else samples  # noqa
    cols = real.values(["id", "filepath"] + [label_path(samples, f) for f in fields])
    ids, paths, vals = cols[0], cols[1], list(zip(*cols[2:]))
    keep = [j for j, v in enumerate(vals) if all(x is not None for x in v)]
    values = [tuple(str(x) for x in vals[j]) for j in keep]
    return [ids[j] for j in keep], [paths[j] for j in keep], values, len(ids) - len(keep)


def _cluster(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means cluster of each row (fewer clusters when there are fewer rows)."""
    k = min(k, len(x))
    if k <= 1:
        return np.zeros(len(x), dtype=int)
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)


# --------------------------------------------------------------------------- fine-tuning


@dataclass
class FinetuneResult:
    """The adapters trained (one per group or cluster), their sizes and times, and the groups that were small."""

    run_key: str
    output_dir: str
    method: str
    base_model: str
    base_kind: str
    base_fingerprint: str
    group_fields: list[str]
    rank: int
    steps: int
    adapters: list[dict]
    small_groups: dict[str, int] = field(default_factory=dict)
    num_trained: int = 0
    num_reused: int = 0
    base_model_bytes: int = 0
    num_skipped: int = 0

    def __fspath__(self) -> str:
        return self.output_dir

    @property
    def adapter_bytes(self) -> float:
        return float(np.mean([a["adapter_bytes"] for a in self.adapters])) if self.adapters else 0.0

    @property
    def seconds_per_adapter(self) -> float | None:
        times = [a["seconds"] for a in self.adapters if a.get("seconds") is not None]
        return float(np.mean(times)) if times else None

    def to_dict(self) -> dict:
        return {**asdict(self), "num_adapters": len(self.adapters), "adapter_bytes": self.adapter_bytes,
                "seconds_per_adapter": self.seconds_per_adapter,
                "adapter_to_base_ratio": self.adapter_bytes / self.base_model_bytes if self.base_model_bytes else None}


def _check_number(name, value, low=0.0, strict=True):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) and (
        value > low if strict else value >= low)
    if not ok:
        raise validation.FairBalanceError(f"{name} must be a finite number {'>' if strict else '>='} {low}, "
                                          f"got {value!r}")


def _model_condition(diff, values: dict) -> tuple[int, ...] | None:
    """The conditional model's (class[, attribute]) indices for a group's field values (None: not known)."""
    fields = [diff.label_field] + ([diff.attribute_field] if diff.attribute_field else [])
    tables = [diff.classes] + ([diff.attributes] if diff.attribute_field else [])
    out = []
    for f, table in zip(fields, tables):
        if values.get(f) not in table:
            return None
        out.append(table.index(values[f]))
    return tuple(out)


@claims.exclusive
def finetune_per_group(
    samples,
    group_field="ground_truth",
    clusters_per_group: int = 1,
    method: str = "lora",
    base_model=None,
    base_model_run: str | None = None,
    rank: int = 4,
    steps: int = 200,
    lr: float = 1e-4,
    batch_size: int = 4,
    prompt: str = "a photo of {token} {group}",
    token_prefix: str = "sks",
    prior_loss_weight: float = 0.0,
    num_prior_images: int = 8,
    embeddings_field: str | None = None,
    resolution: int | None = None,
    min_images: int = MIN_IMAGES_PER_GROUP,
    output_dir: str | None = None,
    seed: int = 0,
    device: str | None = None,
    run_key: str = "finetune_per_group",
    overwrite: bool = False,
    progress=None,
) -> FinetuneResult:
    """Fine-tune one LoRA adapter per group (per cluster with ``clusters_per_group > 1``) of ``base_model``.

    ``group_field``: a field, or a list of fields whose values together make
    a group (e.g. ``["ground_truth", "sa_cluster"]``: class x attribute
    cells). ``base_model``: a folder of :func:`train_conditional_diffusion`
    (or its result; or ``base_model_run``, the key of that run), or a Stable
    Diffusion pipeline folder / hub id. With the conditional model and
    ``method="lora"`` the group fields must include the model's condition
    fields (each adapter is trained under its group's condition).
    ``clusters_per_group``: k-means within each group on ``embeddings_field``
    (stored CLIP embeddings) or, without it, on the pixels (Clustered
    DreamBooth); one adapter and token per cluster. ``prompt`` (Stable
    Diffusion): a template with ``{token}`` (``token_prefix`` + a number, for
    ``dreambooth``; empty for ``lora``) and ``{group}``. Groups with fewer
    than ``min_images`` images are trained anyway, with a warning, and
    listed in ``small_groups``. Adapters already in ``output_dir`` from the
    same run and configuration are kept (a rerun resumes); another
    configuration there is refused unless ``overwrite``. Under ``accelerate
    launch`` / ``torchrun`` each process trains its slice of every global
    batch of ``batch_size`` and the main process alone claims and writes
    (:mod:`fairbalance.distributed`).
    """
    require_peft()
    distributed.setup(device)
    progress = distributed.progress_for(progress)

    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    if method not in METHODS:
        raise validation.FairBalanceError(f"method must be one of {METHODS}, not {method!r}")
    fields = _group_fields(group_field)
    validation.require_fields(samples, fields + ([embeddings_field] if embeddings_field else []))
    for name, value in (("rank", rank), ("steps", steps), ("batch_size", batch_size),
                        ("clusters_per_group", clusters_per_group), ("min_images", min_images),
                        ("num_prior_images", num_prior_images)):
        validation.require_positive_int(name, value)
    _check_number("lr", lr)
    _check_number("prior_loss_weight", prior_loss_weight, strict=False)
    if resolution is not None:
        validation.require_positive_int("resolution", resolution, minimum=8)
    if not isinstance(token_prefix, str) or not token_prefix.strip() or " " in token_prefix:
        raise validation.FairBalanceError(f"token_prefix must be one word, got {token_prefix!r}")
    base_name = os.fspath(runs.given_or_recorded(samples, base_model, base_model_run, "conditional_diffusion",
                                                 "model_dir", "base_model (a model folder or hub id)",
                                                 "base_model_run"))
    kind = base_kind(base_name)
    if kind == "stable_diffusion":
        if "{token}" not in prompt and method == "dreambooth":
            raise validation.FairBalanceError("method='dreambooth' needs '{token}' in prompt")
        try:
            prompt.format(token="t", group="g")
        except (KeyError, IndexError, ValueError) as e:
            raise validation.FairBalanceError(f"prompt may use only {{token}} and {{group}}: {e}") from e
    elif prior_loss_weight > 0:
        raise validation.FairBalanceError(
            "prior_loss_weight applies to Stable Diffusion bases; a conditional model keeps its other "
            "conditions through the frozen base weights")
    ids, paths, values, skipped = _real_groups(samples, fields)
    if not ids:
        raise validation.FairBalanceError(f"No real sample of the view has every field of {fields}")
    base = _load_base(base_name, distributed.device(device), for_training=True)
    if base.kind == "conditional":
        need = [base.diff.label_field] + ([base.diff.attribute_field] if base.diff.attribute_field else [])
        if method == "lora" and not set(need) <= set(fields):
            raise validation.FairBalanceError(
                f"method='lora' on this conditional model trains each adapter under its group's condition: "
                f"group_field must include {need}, got {fields}")
        if method == "lora":
            unknown = sorted({group_key(v) for v in values if _model_condition(base.diff, dict(zip(fields, v))) is None})
            if unknown:
                raise validation.FairBalanceError(
                    f"groups {unknown[:5]} have values the base model was not trained on")
    # plan: groups, clusters, adapter names and tokens (deterministic for the same data and seed)
    order = sorted(set(values), key=lambda v: [(0, int(x), "") if x.lstrip("-").isdigit() else (1, 0, x) for x in v])
    members = {v: [j for j, u in enumerate(values) if u == v] for v in order}
    cluster_of = np.zeros(len(ids), dtype=int)
    if clusters_per_group > 1:
        feats = None
        if embeddings_field:
            emb = dict(zip(*samples.select(ids).values(["id", embeddings_field])))
            missing = [i for i in ids if emb.get(i) is None]
            if missing:
                raise validation.FairBalanceError(f"{len(missing)} sample(s) have no '{embeddings_field}'")
            feats = np.stack([np.asarray(emb[i], dtype=float) for i in ids])
        else:
            feats = training.load_images(paths, _base_size(base, resolution), progress=False).flatten(1).numpy()
        for gi, v in enumerate(order):
            idx = np.array(members[v])
            cluster_of[idx] = _cluster(feats[idx], clusters_per_group, seed + gi)
    plans = []
    for gi, v in enumerate(order):
        for ci in sorted(set(cluster_of[members[v]].tolist())):
            idx = [j for j in members[v] if cluster_of[j] == ci]
            plans.append((gi, v, ci, idx))
    config = {"group_fields": fields, "clusters_per_group": clusters_per_group, "method": method,
              "base_model": base.name, "base_kind": base.kind, "base_fingerprint": base.fingerprint, "rank": rank,
              "steps": steps, "lr": lr, "batch_size": batch_size, "prompt": prompt if base.kind != "conditional" else None,
              "token_prefix": token_prefix, "prior_loss_weight": prior_loss_weight,
              "num_prior_images": num_prior_images, "embeddings_field": embeddings_field, "resolution": resolution,
              "seed": seed, "data_fingerprint": hashlib.sha1("\n".join(
                  sorted(f"{p}\t{group_key(v)}" for p, v in zip(paths, values))).encode()).hexdigest()}
    dataset = samples._root_dataset
    output_dir = os.path.abspath(output_dir or os.path.join(fb_config.data_dir(), "adapters", dataset.name, run_key))
    recorded = {("finetune_method" if k == "method" else k): v for k, v in config.items()}  # "method": the run's

    def prepare():  # the main process only; the others wait for it (and raise its error)
        run = runs.prepare(samples, run_key, "finetune_per_group", {**recorded, "output_dir": output_dir}, [],
                           overwrite, rerun_same_config=True)
        claims.claim_folder(output_dir)
        _claim_adapter_folder(output_dir, config, overwrite)
        _write_manifest(output_dir, config, [], complete=False)  # marks the folder as this configuration's
        return run

    run = distributed.on_main(prepare)
    small = {group_key(v): len(members[v]) for v in order if len(members[v]) < min_images}
    if small:
        warnings.warn(f"{len(small)} group(s) have fewer than {min_images} images (trained anyway): "
                      + ", ".join(f"{k}: {n}" for k, n in list(small.items())[:10]))
    import fiftyone.core.utils as fou

    adapters, trained, reused = [], 0, 0
    with fou.ProgressBar(total=steps * len(plans), progress=progress) as pb:
        for n, (gi, v, ci, idx) in enumerate(plans):
            name = f"g{gi}c{ci}"
            token = f"{token_prefix}{n + 1}" if method == "dreambooth" and base.kind != "conditional" else None
            group = group_key(v)
            meta = {"name": name, "group": group, "group_values": dict(zip(fields, v)), "cluster": ci,
                    "token": token, "num_images": len(idx), "method": method, "rank": rank, "steps": steps,
                    "base_kind": base.kind, "base_fingerprint": base.fingerprint,
                    "prompt": _prompt(prompt, token, group) if base.kind != "conditional" else None,
                    "condition": None}
            if base.kind == "conditional" and method == "lora":
                meta["condition"] = list(_model_condition(base.diff, dict(zip(fields, v))))
            folder = os.path.join(output_dir, name)
            done = distributed.on_main(_read_meta, folder, share=True)  # one view of what is done
            if done is not None and {k: done.get(k) for k in meta} == meta:
                adapters.append({**done, "folder": folder})
                reused += 1
                pb.update(steps)
                continue
            t0 = time.time()
            torch.manual_seed(seed * 1_000_003 + n)  # the adapter's initial weights: the same in every process
            _add_adapter(base, name, rank)
            _train_adapter(base, meta, [paths[j] for j in idx], steps, lr, batch_size, resolution, prior_loss_weight,
                           num_prior_images, prompt, seed * 1_000_003 + n, pb)
            seconds = time.time() - t0
            meta["seconds"] = seconds
            meta["adapter_bytes"] = distributed.on_main(_save_adapter, base, name, folder, meta, share=True)
            _delete_adapter(base, name)
            adapters.append({**meta, "folder": folder})
            trained += 1
    result = FinetuneResult(run_key, output_dir, method, base.name, base.kind, base.fingerprint, fields, rank, steps,
                            adapters, small, trained, reused, base.num_bytes, skipped)

    def record():
        _write_manifest(output_dir, config, adapters)
        run.write(lambda: None)
        run.save_results(result.to_dict())

    distributed.on_main(record)
    return result


def _prompt(template: str, token: str | None, group: str) -> str:
    return " ".join(template.format(token=token or "", group=group).split())


def _base_size(base: _Base, resolution: int | None) -> list[int]:
    if base.kind == "conditional":
        s = base.unet.config.sample_size
        return [s, s] if isinstance(s, int) else list(s)
    s = resolution or base.unet.config.sample_size * base.pipe.vae_scale_factor
    return [s, s]


def _delete_adapter(base: _Base, name: str) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in base.unet.modules():
        if isinstance(layer, BaseTunerLayer) and name in layer.lora_A:
            layer.delete_adapter(name)
    getattr(base.unet, "peft_config", {}).pop(name, None)


def _read_meta(folder: str) -> dict | None:
    path = os.path.join(folder, ADAPTER_META_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _claim_adapter_folder(folder: str, config: dict, overwrite: bool) -> None:
    """Refuse a folder holding adapters of another configuration unless ``overwrite`` (which empties it)."""
    manifest = os.path.join(folder, MANIFEST_FILE)
    previous = None
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                previous = json.load(f).get("config")
        except (OSError, ValueError):
            previous = {"unreadable": True}
    others = [d for d in (os.listdir(folder) if os.path.isdir(folder) else []) if d != MANIFEST_FILE]
    if previous is not None and previous != runs._jsonable(config) or previous is None and others:
        if not overwrite:
            raise validation.FairBalanceError(
                f"{folder} already holds " + ("adapters of another configuration" if previous else
                                              f"{len(others)} file(s) of an unknown run")
                + "; pass overwrite=True to replace them or choose another output_dir")
        shutil.rmtree(folder)
    elif overwrite and os.path.isdir(folder):
        shutil.rmtree(folder)
    validation.require_writable_dir(folder)


def _write_manifest(folder: str, config: dict, adapters: list[dict], complete: bool = True) -> None:
    tmp = os.path.join(folder, MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"config": runs._jsonable(config), "complete": complete,
                   "adapters": [{k: v for k, v in a.items() if k != "folder"} for a in adapters]}, f, indent=1)
    os.replace(tmp, os.path.join(folder, MANIFEST_FILE))


def _train_adapter(base: _Base, meta: dict, paths: list[str], steps: int, lr: float, batch_size: int,
                   resolution, prior_loss_weight: float, num_prior_images: int, prompt: str, seed: int, pb) -> None:
    params = [p for p in base.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    dev = next(base.unet.parameters()).device
    if base.kind == "conditional":
        step_fn = _conditional_step(base, meta, paths, gen, dev)
    else:
        step_fn = _sd_step(base, meta, paths, resolution, prior_loss_weight, num_prior_images, prompt, gen, dev)
    base.unet.train()
    for _ in range(steps):
        # every process draws the same global batch (and its noise) and computes its slice of the loss
        idx = torch.randint(0, len(paths), (batch_size,), generator=gen)
        loss = step_fn(idx, distributed.shard(batch_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        distributed.sum_gradients(params)
        opt.step()
        pb.update()
    base.unet.eval()


def _diffusion_target(scheduler, x0, noise, t):
    kind = scheduler.config.prediction_type
    return noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, t)


def _mse_share(pred, target, sh: distributed.Shard) -> torch.Tensor:
    """This process's share of the global batch's mean squared error."""
    return sh.mean(F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1))


def _conditional_step(base: _Base, meta: dict, paths, gen, dev):
    from diffusers import DDPMScheduler

    diff = base.diff
    sched = DDPMScheduler.from_pretrained(os.path.join(diff.folder, "scheduler"))
    x = training.load_images(paths, _base_size(base, None), scale="symmetric", progress=False)
    net = diff.model
    null = net.condition.null(1)[0]
    cond = null if meta["condition"] is None else torch.as_tensor(meta["condition"])
    drop_p = float(diff.config.get("cond_drop_prob", 0.1)) if meta["condition"] is not None else 0.0

    def step(idx, sh):
        xb = x[idx]
        noise = torch.randn(xb.shape, generator=gen)[sh.part].to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(xb),), generator=gen)[sh.part].to(dev)
        labels = cond.expand(len(xb), -1).clone()
        drop = torch.rand(labels.shape, generator=gen) < drop_p
        labels = torch.where(drop, null.expand_as(labels), labels)[sh.part].to(dev)
        xb = xb[sh.part].to(dev)
        pred = net(sched.add_noise(xb, noise, t), t, labels)
        return _mse_share(pred, _diffusion_target(sched, xb, noise, t), sh)

    return step


def _encode_prompt(pipe, text: str, dev) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _sd_step(base: _Base, meta: dict, paths, resolution, prior_loss_weight, num_prior_images, prompt, gen, dev):
    from diffusers import DDPMScheduler

    pipe = base.pipe
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    size = _base_size(base, resolution)
    scale = pipe.vae.config.scaling_factor

    def latents(pixels):
        with torch.no_grad():
            return torch.cat([pipe.vae.encode(pixels[b:b + 16].to(dev)).latent_dist.sample(gen) * scale
                              for b in range(0, len(pixels), 16)])

    inst = latents(training.load_images(paths, size, scale="symmetric", progress=False))
    inst_text = _encode_prompt(pipe, meta["prompt"], dev)
    prior = prior_text = None
    if prior_loss_weight > 0:
        class_prompt = _prompt(prompt, None, meta["group"])
        activate(base.unet, None)
        with torch.no_grad():
            imgs = pipe([class_prompt] * num_prior_images, height=size[0], width=size[1], output_type="pt",
                        num_inference_steps=min(PRIOR_STEPS, sched.config.num_train_timesteps // 2),
                        generator=[torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
                                   for _ in range(num_prior_images)]).images
        activate(base.unet, meta["name"])
        prior = latents(imgs * 2 - 1)
        prior_text = _encode_prompt(pipe, class_prompt, dev)

    def loss_on(lat, text, sh):
        noise = torch.randn(lat.shape, generator=gen)[sh.part].to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(lat),), generator=gen)[sh.part].to(dev)
        lat = lat[sh.part]
        pred = base.unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=text.expand(len(lat), -1, -1)).sample
        return _mse_share(pred, _diffusion_target(sched, lat, noise, t), sh)

    def step(idx, sh):
        loss = loss_on(inst[idx], inst_text, sh)
        if prior is not None:
            pidx = torch.randint(0, len(prior), (len(idx),), generator=gen)
            loss = loss + prior_loss_weight * loss_on(prior[pidx], prior_text, sh)
        return loss

    return step


# --------------------------------------------------------------------------- loading adapters


@dataclass
class GroupAdapters:
    """A base model with its per-group adapters loaded side by side (switch with :meth:`use`)."""

    base: _Base
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


def load_group_adapters(adapters_dir, base_model=None, device=None) -> GroupAdapters:
    """Load every adapter of a :func:`finetune_per_group` folder onto its base model (or ``base_model``).

    Adapters trained on another base model (another fingerprint) are refused.
    """
    require_peft()
    folder = os.fspath(adapters_dir)
    manifest = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(manifest):
        raise models.ModelNotFoundError(f"No per-group adapters in {folder} ({MANIFEST_FILE} missing)")
    with open(manifest) as f:
        saved = json.load(f)
    if not saved.get("complete"):
        raise models.ModelNotFoundError(f"The adapters in {folder} are incomplete (fine-tuning was interrupted "
                                        "or is running); run finetune_per_group again to finish them")
    cfg = saved["config"]
    base = _load_base(base_model if base_model is not None else cfg["base_model"], device)
    adapters = []
    for a in saved["adapters"]:
        path = os.path.join(folder, a["name"])
        meta = _read_meta(path)
        if meta is None:
            raise models.ModelNotFoundError(f"Adapter {path} is missing or incomplete; run finetune_per_group again")
        if meta.get("base_fingerprint") != base.fingerprint:
            raise validation.FairBalanceError(
                f"The adapters in {folder} were trained on another base model ({cfg['base_model']}, fingerprint "
                f"{str(meta.get('base_fingerprint'))[:10]}) than {base.name} (fingerprint {base.fingerprint[:10]}); "
                "they cannot be loaded onto it")
        _load_adapter(base, meta["name"], path)
        adapters.append({**meta, "folder": path})
    activate(base.unet, None)
    return GroupAdapters(base, os.path.abspath(folder), cfg, adapters)


# --------------------------------------------------------------------------- generation


@dataclass
class _Input:
    adapter: str | None
    condition: tuple[int, ...] | None
    seed: int
    prompt: str | None = None
    source: str | None = None  # filepath of the image an edit starts from
    source_condition: tuple[int, ...] | None = None


@claims.exclusive
def generate_per_group(
    samples,
    adapters=None,
    finetune_run: str | None = None,
    base_model=None,
    mode: str = "equal",
    per_group: int | None = None,
    total: int | None = None,
    groups: str = "observed",
    source: str = "noise",
    edit_strength: float = 0.5,
    guidance_scale: float = 3.0,
    attribute_guidance_scale: float | None = None,
    guidance_reference: str = "null",
    num_inference_steps: int = 25,
    scheduler: str = "ddim",
    height: int | None = None,
    width: int | None = None,
    output_dir: str | None = None,
    target_dataset=None,
    seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
    run_key: str = "generate_per_group",
    overwrite: bool = False,
    progress=None,
) -> GenerationResult:
    """Generate a group-balanced set with the adapters of :func:`finetune_per_group` and add it with provenance.

    ``adapters``: the folder (or result) of :func:`finetune_per_group`, or
    ``finetune_run``: the key of that run. ``mode``: ``equal`` (``per_group``
    images per group, or ``total`` split equally) or ``fill`` (every group
    up to the largest, or up to ``per_group`` when given, real images
    counted). A group of several clusters splits its images over its
    clusters in proportion to their sizes. ``groups="all"`` (a conditional
    base whose condition fields are the group fields) also fills the
    groups without real images, with the base model alone (no adapter).
    ``source="edit"`` (conditional base, ``lora`` adapters) starts each
    image from a real image of the same class noised to ``edit_strength``
    (see :func:`fairbalance.generate_balanced`). Every sample gets
    ``generated=True``, the group's field values and ``generation``
    (adapter, token, cluster, seed, base model); image ``i`` of a cluster
    always has the same seed and file, so a rerun adds nothing twice and an
    interrupted run resumes. ``base_model``: load the adapters onto this base
    instead of the recorded one (refused when it is another model).
    """
    from fairbalance.diffusion import validate_sampling

    require_peft()
    validation.require_nonempty(samples)
    adapters = runs.given_or_recorded(samples, adapters, finetune_run, "finetune_per_group", "output_dir",
                                      "adapters (a folder)", "finetune_run")
    if mode not in ("equal", "fill"):
        raise validation.FairBalanceError(f"mode must be 'equal' or 'fill', not {mode!r}")
    if mode == "equal" and per_group is None and total is None:
        raise validation.FairBalanceError("mode='equal' needs per_group (images per group) or total")
    if groups not in ("observed", "all"):
        raise validation.FairBalanceError(f"groups must be 'observed' or 'all', not {groups!r}")
    if source not in ("noise", "edit"):
        raise validation.FairBalanceError(f"source must be 'noise' or 'edit', not {source!r}")
    if guidance_reference not in ("null", "source"):
        raise validation.FairBalanceError(f"guidance_reference must be 'null' or 'source', not {guidance_reference!r}")
    if guidance_reference == "source" and source != "edit":
        raise validation.FairBalanceError("guidance_reference='source' needs source='edit' (a source image)")
    validate_sampling(guidance_scale, num_inference_steps, scheduler, attribute_guidance_scale,
                      edit_strength if source == "edit" else None)
    validation.require_positive_int("batch_size", batch_size)
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            validation.require_positive_int(name, value, minimum=8)
    loaded = load_group_adapters(adapters, base_model, device)
    base, cfg = loaded.base, loaded.config
    fields = list(cfg["group_fields"])
    method = cfg["method"]
    if base.kind != "conditional" and (source == "edit" or groups == "all"):
        raise validation.FairBalanceError("source='edit' and groups='all' need a conditional base model")
    if base.kind == "conditional":
        need = [base.diff.label_field] + ([base.diff.attribute_field] if base.diff.attribute_field else [])
        if source == "edit" and method != "lora":
            raise validation.FairBalanceError("source='edit' works with method='lora' adapters (a condition)")
        if groups == "all" and sorted(fields) != sorted(need):
            raise validation.FairBalanceError(
                f"groups='all' needs adapters grouped by exactly the model's condition fields {need}, not {fields}")
    ids, paths, values, _ = _real_groups(samples, fields)
    counts = {}
    for v in values:
        counts[group_key(v)] = counts.get(group_key(v), 0) + 1
    by_group = loaded.by_group()
    group_values = {a["group"]: a["group_values"] for a in loaded.adapters}
    if groups == "all":
        d = base.diff
        for c in d.classes:
            for a in (d.attributes or [None]):
                vals = {d.label_field: c, **({d.attribute_field: a} if a is not None else {})}
                key = group_key(vals[f] for f in fields)
                counts.setdefault(key, 0)
                group_values.setdefault(key, vals)
    else:
        counts = {k: n for k, n in counts.items() if k in by_group}
        missing = sorted(set(by_group) - set(counts))
        for k in missing:  # adapters of groups absent from this view: balanced from zero real images
            counts[k] = 0
    if not counts:
        raise validation.FairBalanceError("No group of the view has an adapter")
    plan = plan_counts(counts, "cells" if mode == "fill" and per_group is not None else mode, total, per_group)
    if base.kind == "conditional" and method != "lora":
        lacking = [k for k, n in plan.items() if n and k not in by_group]
        if lacking:
            raise validation.FairBalanceError(f"groups {lacking[:5]} have no adapter to generate them with")
    # the sources of edits: real images of each class, with their own condition
    class_sources = {}
    if source == "edit":
        d = base.diff
        rids, rpaths, rvals, _ = _real_groups(samples, need)
        for p, v in zip(rpaths, rvals):
            cond = _model_condition(d, dict(zip(need, v)))
            if cond is not None:
                class_sources.setdefault(cond[0], []).append((p, cond))
    setting = {"adapters": loaded.folder, "base_model": base.name, "base_fingerprint": base.fingerprint,
               "adapter_method": method, "guidance_scale": guidance_scale,
               "attribute_guidance_scale": attribute_guidance_scale, "guidance_reference": guidance_reference,
               "num_inference_steps": num_inference_steps, "scheduler": scheduler, "source": source,
               "edit_strength": edit_strength if source == "edit" else None, "height": height, "width": width}
    provenance = {**setting, "run_key": run_key}
    jobs = []
    order = sorted(plan)
    for gi, key in enumerate(order):
        n = plan[key]
        if not n:
            continue
        group_adapters = by_group.get(key, [])
        sizes = np.array([a["num_images"] for a in group_adapters], dtype=float)
        shares = _split(n, sizes) if len(group_adapters) else [n]
        vals = group_values[key]
        cond = _model_condition(base.diff, vals) if base.kind == "conditional" else None
        for ai, share in enumerate(shares):
            a = group_adapters[ai] if group_adapters else None
            ci = a["cluster"] if a else 0
            use_cond = cond if (a is None or a.get("condition") is not None) else None
            cands = class_sources.get(cond[0], []) if source == "edit" and cond else []
            if source == "edit" and share and not cands:
                raise validation.FairBalanceError(f"source='edit': no real image of the class of group '{key}'")
            for i in range(share):
                img_seed = seed * 1_000_003 + gi * 100_003 + ci * 1_009 + i
                src = cands[np.random.default_rng([seed, gi, ci, i]).integers(len(cands))] if cands else None
                prov = {"group": key, "adapter": a["name"] if a else None, "token": a.get("token") if a else None,
                        "cluster": ci, "seed": img_seed, "prompt": a.get("prompt") if a else None}
                if src:
                    prov["source_filepath"] = src[0]
                jobs.append(GenerationJob(f"g{gi:03d}c{ci}_seed{seed}_{i:05d}.png", key, dict(vals), prov,
                                          _Input(prov["adapter"], use_cond, img_seed, prov["prompt"],
                                                 src[0] if src else None, src[1] if src else None)))
    target, output_dir, run = start_generation(
        samples, target_dataset, output_dir, run_key, "generate_per_group",
        {**provenance, "mode": mode, "per_group": per_group, "total": total, "groups": groups, "seed": seed},
        setting, overwrite)
    for job in jobs:
        job.filepath = os.path.join(output_dir, job.filepath)
    existing = set(target.values("filepath")) if len(target) else set()
    jobs = [j for j in jobs if j.filepath not in existing]
    render = _conditional_renderer(loaded, provenance) if base.kind == "conditional" else _sd_renderer(
        loaded, provenance)
    try:
        added = run_generation(jobs, target, render, provenance, batch_size, progress)
    finally:
        activate(base.unet, None)
    return finish_generation(run, GenerationResult(run_key, {k: added.get(k, 0) for k in plan}, plan, output_dir,
                                                   target.name, run.resumed, counts))


def _split(n: int, sizes: np.ndarray) -> list[int]:
    """``n`` images over clusters in proportion to their sizes (largest remainders), deterministic."""
    raw = n * sizes / sizes.sum()
    out = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - out), kind="stable")[: n - out.sum()]:
        out[j] += 1
    return out.tolist()


def _runs_by_adapter(batch):
    """Consecutive jobs of the same adapter (the loop's batches follow the plan's order)."""
    out, start = [], 0
    for j in range(1, len(batch) + 1):
        if j == len(batch) or batch[j].payload.adapter != batch[start].payload.adapter:
            out.append(batch[start:j])
            start = j
    return out


def _conditional_renderer(loaded: GroupAdapters, provenance: dict):
    from fairbalance.diffusion import sample_images

    diff = loaded.base.diff
    size = diff.unet.config.sample_size

    def render(batch):
        images = []
        for part in _runs_by_adapter(batch):
            loaded.use(part[0].payload.adapter)
            inputs = [j.payload for j in part]
            null = tuple(diff.model.condition.factor_sizes)
            conds = [d.condition if d.condition is not None else null for d in inputs]
            init = ref = None
            if inputs[0].source is not None:
                init = training.load_images([d.source for d in inputs], [size, size], scale="symmetric",
                                            progress=False)
                if provenance["guidance_reference"] == "source":
                    ref = [d.source_condition for d in inputs]
            images.extend(sample_images(diff, conds, [d.seed for d in inputs], provenance["guidance_scale"],
                                        provenance["num_inference_steps"], provenance["scheduler"],
                                        provenance["attribute_guidance_scale"], init,
                                        provenance["edit_strength"] if init is not None else None, ref))
        return images

    return render


def _sd_renderer(loaded: GroupAdapters, provenance: dict):
    pipe = loaded.base.pipe
    pipe.set_progress_bar_config(disable=True)
    from diffusers import DDIMScheduler, DDPMScheduler

    pipe.scheduler = (DDIMScheduler if provenance["scheduler"] == "ddim" else DDPMScheduler).from_config(
        pipe.scheduler.config)

    def render(batch):
        images = []
        for part in _runs_by_adapter(batch):
            loaded.use(part[0].payload.adapter)
            gens = [torch.Generator(device="cpu").manual_seed(j.payload.seed) for j in part]
            out = pipe([j.payload.prompt for j in part], guidance_scale=provenance["guidance_scale"],
                       num_inference_steps=provenance["num_inference_steps"], generator=gens,
                       height=provenance["height"], width=provenance["width"], output_type="pil")
            images.extend(out.images)
        return images

    return render
