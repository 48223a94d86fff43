"""The single place that loads models: CLIP (open_clip), image-to-text
captioners (transformers), diffusion pipelines (diffusers), and the model
families fairbalance trains and saves in a folder (:data:`SAVED_FAMILIES`).

Models are named the way each library names them:

- CLIP: a built-in open_clip name plus a pretrained tag (``"ViT-B-32"``,
  ``"openai"``) or a checkpoint file as ``pretrained``; ``"hf-hub:org/repo"``;
  ``"local-dir:/path"`` (a folder with ``open_clip_config.json`` + weights).
- Captioners and diffusion pipelines: a Hugging Face hub id or a local folder
  written by ``save_pretrained``.

- Saved families (a classifier, a conditional diffusion model, per-group
  LoRA adapters): a loaded model, its folder, or (``runs.recorded_model``)
  the key of the run that trained it. Each family's ``from_pretrained`` /
  ``save_pretrained`` pair lives in the module that owns its class, which
  registers it here (:func:`register_saved_family`); :func:`load_saved` is
  the one way from a user's argument to the loaded model.

Offline first: weights already on disk (a local path or the Hugging Face
cache) are used without touching the network; when they are absent and the
hub cannot be reached (``HF_HUB_OFFLINE=1``, or no route to it within a couple
of seconds) one :class:`ModelNotFoundError` names the model and how to
provide it. Loaded models are cached per process.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from fairbalance.core import validation

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"

_cache: dict[tuple, Any] = {}
_cache_lock = threading.Lock()


class ModelNotFoundError(FileNotFoundError, validation.FairBalanceError):
    """Model weights are not available locally and cannot be downloaded (or are corrupt): bad input, too."""


# --------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given (refused with :class:`FairBalanceError` when unknown or absent here), else the best
    available: cuda > mps > cpu."""
    if device is not None:
        validation.require_device(device)
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``dtype`` if given, else float16 on GPUs and float32 on the CPU."""
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


# --------------------------------------------------------------------------- offline policy


def hub_offline() -> bool:
    """True when the Hugging Face hub must not (or cannot) be contacted."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    if os.environ.get("TRANSFORMERS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return not _hub_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=4)
def _hub_reachable(endpoint: str, timeout: float = 2.0) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _corrupt_errors() -> tuple:
    """What reading corrupt or truncated model files raises (pickle, zip, safetensors, JSON, config errors)."""
    import pickle

    import zipfile

    errors = [OSError, ValueError, RuntimeError, KeyError, IndexError, TypeError, EOFError, pickle.UnpicklingError,
              zipfile.BadZipFile]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def load_or_explain(kind: str, where: str, build: Callable[[], Any]) -> Any:
    """``build()``, with corrupt or incomplete model files reported as one :class:`ModelNotFoundError` naming them
    (a bad-input error the CLI maps to exit 2), instead of UnpicklingError / SafetensorError / JSONDecodeError."""
    try:
        return build()
    except (validation.FairBalanceError, torch.OutOfMemoryError):
        raise
    except _corrupt_errors() as e:
        raise ModelNotFoundError(
            f"The {kind} at {where} could not be loaded: its files are corrupt or incomplete "
            f"({type(e).__name__}: {str(e)[:300]}); replace them (save the model again)") from e


def _missing(kind: str, name: str, how: str, cause: Exception | None = None) -> ModelNotFoundError:
    msg = (
        f"{kind} '{name}' is not available on this machine and the Hugging Face hub cannot be "
        f"reached (offline). Provide it by {how}."
    )
    err = ModelNotFoundError(msg)
    err.__cause__ = cause
    return err


def _cached(key: tuple, build: Callable[[], Any]) -> Any:
    with _cache_lock:
        if key not in _cache:
            _cache[key] = build()
        return _cache[key]


def clear_model_cache() -> None:
    """Drop every model loaded in this process (frees memory)."""
    with _cache_lock:
        _cache.clear()


# --------------------------------------------------------------------------- CLIP


@dataclass(frozen=True)
class ModelSpec:
    """How a model was named and resolved; recorded in every run's config."""

    family: str
    model: str
    pretrained: str | None = None
    resolved: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ClipModel:
    """A loaded CLIP model with its image transform and tokenizer."""

    spec: ModelSpec
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    device: torch.device
    dtype: torch.dtype

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        return int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[-1])

    @torch.inference_mode()
    def encode_text(self, texts: list[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """Text embeddings (float32, on the CPU, in input order), L2-normalized by default.

        Texts are batched by token length and, for open_clip's standard
        causal text tower, run only up to the longest text of each batch
        instead of the full context: the result is the same (causal attention
        never looks at the padding) and long lists like WordNet's 82k glosses
        encode several times faster. ``texts`` may also be their tokens (this model's tokenizer's output).
        """
        if not len(texts):
            return torch.empty(0, self.embed_dim)
        tokens = texts.long() if isinstance(texts, torch.Tensor) else self.tokenizer(list(texts))
        lengths = (tokens != 0).sum(dim=1)
        order = torch.argsort(lengths, stable=True)
        out = torch.empty(len(texts), self.embed_dim)
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            batch = tokens[idx].to(self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                emb = _encode_text_trimmed(self.model, batch, int(lengths[idx].max()))
            out[idx] = emb.float().cpu()
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings of a preprocessed batch (float32, on the CPU)."""
        pixels = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            emb = self.model.encode_image(pixels)
        emb = emb.float().cpu()
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


def _encode_text_trimmed(model, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``model.encode_text`` over the first ``length`` tokens, where that is exactly equivalent."""
    import open_clip

    exact = (
        type(model) is open_clip.CLIP
        and getattr(model, "text_pool_type", "argmax") in ("argmax", "last")
        and isinstance(getattr(model, "attn_mask", None), torch.Tensor)
        and length < tokens.shape[1]
    )
    if not exact:
        return model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    tokens = tokens[:, :length]
    cast = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return x


def _hf_snapshot(repo_id: str, kind: str, how: str, allow_patterns=None) -> str:
    """A local snapshot folder of ``repo_id``: the cache when offline, else a download."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True, allow_patterns=allow_patterns)
    except Exception as cached_err:  # not in the local cache
        if hub_offline():
            raise _missing(kind, repo_id, how, cached_err) from cached_err
    try:
        return snapshot_download(repo_id, allow_patterns=allow_patterns)
    except Exception as e:
        raise ModelNotFoundError(f"{kind} '{repo_id}' could not be downloaded: {e}") from e


def _resolve_clip(model: str, pretrained: str | None) -> tuple[str, dict, ModelSpec]:
    """Turn a user's CLIP name into open_clip arguments that need no network."""
    import open_clip

    how = (
        "passing model='local-dir:/path' (a folder with open_clip_config.json and weights), "
        "a checkpoint file as pretrained=..., or running once with network access so the "
        "weights land in the Hugging Face cache"
    )
    if model.startswith(LOCAL_DIR_PREFIX):
        path = os.path.abspath(os.path.expanduser(model[len(LOCAL_DIR_PREFIX) :]))
        if not os.path.isfile(os.path.join(path, "open_clip_config.json")):
            raise ModelNotFoundError(
                f"CLIP model '{model}': {path} is not a folder with open_clip_config.json and weights"
            )
        return LOCAL_DIR_PREFIX + path, {}, ModelSpec("open_clip", model, None, path)
    if model.startswith(HF_HUB_PREFIX):
        repo = model[len(HF_HUB_PREFIX) :]
        path = _hf_snapshot(repo, "CLIP model", how)
        return LOCAL_DIR_PREFIX + path, {}, ModelSpec("open_clip", model, None, path)

    name = model.replace("/", "-")
    if open_clip.get_model_config(name) is None:
        raise ModelNotFoundError(
            f"Unknown CLIP architecture '{model}'. Use one of open_clip.list_models(), "
            "'hf-hub:org/repo' or 'local-dir:/path'."
        )
    if not pretrained:
        return name, {}, ModelSpec("open_clip", name, None, None)
    if os.path.isfile(os.path.expanduser(pretrained)):
        path = os.path.abspath(os.path.expanduser(pretrained))
        return name, {"pretrained": path}, ModelSpec("open_clip", name, pretrained, path)
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
            raise ModelNotFoundError(f"CLIP checkpoint file not found: {pretrained}")
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ModelNotFoundError(f"'{pretrained}' is not a pretrained tag of {name} (known: {tags})")
    overrides = {
        "image_mean": cfg.get("mean"),
        "image_std": cfg.get("std"),
        "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
    }
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
        path = _hf_file(repo, filename or "open_clip_pytorch_model.bin", f"CLIP weights {name}/{pretrained}", how)
        return name, {"pretrained": path, **overrides}, ModelSpec("open_clip", name, pretrained, path)
    if hub_offline():
        raise _missing("CLIP weights", f"{name}/{pretrained}", how)
    return name, {"pretrained": pretrained}, ModelSpec("open_clip", name, pretrained, cfg.get("url"))


def _hf_file(repo: str, filename: str, kind: str, how: str) -> str:
    from huggingface_hub import hf_hub_download

    candidates = [filename]
    if filename.endswith((".bin", ".pth")):
        candidates.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
    for f in candidates:
        try:
            return hf_hub_download(repo, f, local_files_only=True)
        except Exception:
            continue
    if hub_offline():
        raise _missing(kind, f"{repo}/{filename}", how)
    last: Exception | None = None
    for f in candidates:
        try:
            return hf_hub_download(repo, f)
        except Exception as e:
            last = e
    raise ModelNotFoundError(f"{kind} could not be downloaded from {repo}: {last}") from last


def clip_problem(model: str = "ViT-B-32", pretrained: str | None = "openai") -> str | None:
    """Why :func:`load_clip` would fail for these arguments (e.g. weights missing offline), or None.

    Resolves names and files only (no weights are loaded): quick enough for
    a form to check as the user types.
    """
    try:
        _resolve_clip(model, pretrained)
    except ModelNotFoundError as e:
        return str(e)
    return None


def load_clip(
    model: str = "ViT-B-32",
    pretrained: str | None = "openai",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ClipModel:
    """Load an open_clip model in eval mode (cached per process)."""
    dev = resolve_device(device)
    dt = resolve_dtype(dev, dtype)
    name, kwargs, spec = _resolve_clip(model, pretrained)

    def build():
        import open_clip

        clip_model, _, preprocess = open_clip.create_model_and_transforms(name, device=dev, **kwargs)
        clip_model = clip_model.eval().to(dev)
        if dt != torch.float32:
            clip_model = clip_model.to(dt)
        return ClipModel(spec, clip_model, preprocess, open_clip.get_tokenizer(name), dev, dt)

    return _cached(("clip", spec, str(dev), str(dt)), lambda: load_or_explain("CLIP model", spec.resolved or name, build))


# --------------------------------------------------------------------------- transformers captioners


def _dtype_kwarg(module, since: str, dtype: torch.dtype) -> dict:
    """``dtype=`` where the library has renamed ``torch_dtype`` (transformers 4.56, diffusers 0.42)."""
    from packaging.version import Version

    return {"dtype" if Version(module.__version__) >= Version(since) else "torch_dtype": dtype}


def _pretrained_source(model: str, kind: str, how: str) -> tuple[str, ModelSpec]:
    family = "transformers" if kind == "Captioning model" else "diffusers"
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        path = os.path.abspath(path)
        return path, ModelSpec(family, model, None, path)
    if os.path.sep in model and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise ModelNotFoundError(f"{kind} path does not exist: {model}")
    return _hf_snapshot(model, kind, how), ModelSpec(family, model, None, model)


@dataclass
class Captioner:
    """A loaded image-to-text model with its processor."""

    spec: ModelSpec
    model: torch.nn.Module
    processor: Any
    device: torch.device
    dtype: torch.dtype


def load_captioner(
    model: str = "Salesforce/blip-image-captioning-base",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Captioner:
    """Load a transformers image-to-text model and its processor (cached per process)."""
    how = "passing a local folder written by save_pretrained, or running once with network access"
    dev = resolve_device(device)
    dt = resolve_dtype(dev, dtype)
    path, spec = _pretrained_source(model, "Captioning model", how)

    def build():
        import transformers

        processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
        auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        try:
            net = auto.from_pretrained(path, local_files_only=True, **_dtype_kwarg(transformers, "4.56", dt))
        except ValueError:  # older transformers: BLIP-style models live under Vision2Seq
            net = transformers.AutoModelForVision2Seq.from_pretrained(
                path, local_files_only=True, **_dtype_kwarg(transformers, "4.56", dt)
            )
        return Captioner(spec, net.eval().to(dev), processor, dev, dt)

    return _cached(("captioner", spec, str(dev), str(dt)), lambda: load_or_explain("captioning model", path, build))


# --------------------------------------------------------------------------- diffusers pipelines


def load_diffusion_pipeline(
    model: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    **kwargs,
):
    """Load a diffusers pipeline (hub id or local folder) onto ``device`` (cached per process)."""
    import diffusers

    how = "passing a local folder written by pipeline.save_pretrained, or running once with network access"
    dev = resolve_device(device)
    dt = resolve_dtype(dev, dtype)
    path, spec = _pretrained_source(model, "Diffusion pipeline", how)

    def build():
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            path, local_files_only=True, **_dtype_kwarg(diffusers, "0.42", dt), **kwargs
        )
        pipe = pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        pipe.fairbalance_spec = spec
        return pipe

    key = ("diffusion", spec, str(dev), str(dt), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    return _cached(key, lambda: load_or_explain("diffusion pipeline", path, build))


# --------------------------------------------------------------------------- models fairbalance saves


@dataclass(frozen=True)
class SavedFamily:
    """A model family fairbalance trains and saves in a folder, registered by the module that owns its class."""

    name: str  # what messages call it ("classifier")
    model_class: type  # a loaded model of the family passes as is
    marker: str  # the file its folder holds (written last by ``save_pretrained``)
    from_pretrained: Callable[..., Any]  # (folder, device=None, **options) -> model
    run_method: str  # the run that records its folder
    run_field: str  # the key of that run's config that holds the folder


SAVED_FAMILIES: dict[str, SavedFamily] = {}


def register_saved_family(family: SavedFamily) -> SavedFamily:
    SAVED_FAMILIES[family.name] = family
    return family


def load_saved(family: str, model, device=None, **options):
    """A user's ``model`` of a saved family, loaded: a loaded model as is; a folder, which must exist and hold
    the family's marker file (else a :class:`ModelNotFoundError` before anything is read), read by the
    family's ``from_pretrained``; corrupt or incomplete files are one error naming the folder."""
    fam = SAVED_FAMILIES[family]
    if isinstance(model, fam.model_class):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise validation.FairBalanceError(
            f"a {fam.name} must be given as its folder (a path), not {type(model).__name__}")
    folder = os.path.abspath(os.path.expanduser(os.fspath(model)))
    if not os.path.isdir(folder):
        raise ModelNotFoundError(f"No {fam.name} in {folder}: the folder does not exist")
    if not os.path.isfile(os.path.join(folder, fam.marker)):
        raise ModelNotFoundError(f"No {fam.name} in {folder} ({fam.marker} missing)")
    return load_or_explain(fam.name, folder, lambda: fam.from_pretrained(folder, device, **options))
