"""Text-to-image generation from (filtered) captions, added to the dataset with provenance (DiffuBias)."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
import warnings

import torch

from fairbalance.core import models, runs, sharding, validation
from fairbalance.generate.engine import GenerationJob, check_shard_args, generate_plan, require_own_target
from fairbalance.generate.generation import GenerationResult


def _prompt_seed(seed: int, source_id: str, prompt: str, k: int) -> int:
    digest = hashlib.sha256(f"{seed}|{source_id}|{prompt}|{k}".encode()).hexdigest()
    return int(digest[:12], 16)


def _truncate(pipe, prompts: list[str]) -> list[str]:
    tok = getattr(pipe, "tokenizer", None)
    if tok is None:
        return prompts
    limit = tok.model_max_length
    out = []
    for p in prompts:
        ids = tok(p, truncation=False)["input_ids"]
        if len(ids) > limit:
            warnings.warn(f"prompt longer than the text encoder's {limit} tokens was truncated: {p[:60]}...")
            p = tok.decode(ids[1:limit - 1], skip_special_tokens=True)
        out.append(p)
    return out


@runs.writer("text_to_image", resumable=True)
def generate_from_captions(
    samples,
    caption_field: str = "filtered_captions",
    model: str = "runwayml/stable-diffusion-v1-5",
    images_per_caption: int = 1,
    output_dir: str | None = None,
    target_dataset=None,
    label_field: str | None = "ground_truth",
    guidance_scale: float = 7.5,
    num_inference_steps: int = 30,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    device: str | None = None,
    safety_checker: bool = True,
    attention_slicing: bool = False,
    run_key: str = "text_to_image",
    overwrite: bool = False,
    shard: int | None = None,
    num_shards: int | None = None,
    chunk_size: int = sharding.DEFAULT_CHUNK_SIZE,
    progress=None,
) -> GenerationResult | sharding.ShardResult:
    """Generate images from each sample's captions and add them as new samples.

    Each image gets ``generated=True``, ``generation`` (prompt, seed, model,
    source sample id, guidance, steps) and the tag ``generated``; the label of
    ``label_field`` is copied from the source sample. Every image's seed
    derives from (seed, source, prompt, k), so reruns add nothing twice and
    an interrupted run resumes; the run key or ``output_dir`` of another
    setting is refused unless ``overwrite=True`` (which replaces that run's
    images and samples). ``safety_checker=False`` removes the
    pipeline's NSFW checker explicitly (it blacks out images it flags).
    Prompts longer than the text encoder's limit are truncated with a warning.

    ``shard, num_shards``: make only shard ``shard`` of ``num_shards`` of the
    planned images (image ``i`` to shard ``i % num_shards``), as
    :func:`fairbalance.generate.generation.generate_balanced` does (see there).
    """
    sharded = check_shard_args(samples, target_dataset, shard, num_shards, overwrite)
    prompts = _plan_prompts(samples, caption_field, images_per_caption, label_field, guidance_scale,
                            num_inference_steps, batch_size)
    kwargs = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    pipe = models.load_diffusion_pipeline(model, device=device, **kwargs)
    if attention_slicing:  # lower peak memory on small GPUs; SDPA attention is the default otherwise
        pipe.enable_attention_slicing()
    spec = getattr(pipe, "fairbalance_spec", None)
    setting = {"model": spec.to_dict() if spec else model, "guidance_scale": guidance_scale,
               "num_inference_steps": num_inference_steps, "height": height, "width": width,
               "safety_checker": safety_checker}
    provenance = {**setting, "run_key": run_key}
    jobs = []
    for src, prompt, label in prompts:
        for k in range(images_per_caption):
            s = _prompt_seed(seed, src, prompt, k)
            jobs.append(GenerationJob(f"{src}_{s:012x}.png", str(label),
                                      {label_field: label} if label_field and label is not None else {},
                                      {"prompt": prompt, "seed": s, "source_id": src}))
    planned = dict(Counter(j.key for j in jobs))

    def render(batch):
        gens = [torch.Generator(device="cpu").manual_seed(j.provenance["seed"]) for j in batch]
        out = pipe(_truncate(pipe, [j.provenance["prompt"] for j in batch]), guidance_scale=guidance_scale,
                   num_inference_steps=num_inference_steps, generator=gens, height=height, width=width,
                   output_type="pil")
        return out.images

    config = {**provenance, "caption_field": caption_field, "images_per_caption": images_per_caption, "seed": seed,
              "label_field": label_field}
    return generate_plan(samples, "generate_from_captions", "text_to_image", run_key, jobs, config, setting, render,
                         provenance, batch_size, GenerationResult, {"planned": planned, "counts_before": None},
                         target_dataset, output_dir, overwrite, sharded, shard, num_shards, chunk_size, progress)


def _plan_prompts(samples, caption_field="filtered_captions", images_per_caption=1, label_field="ground_truth",
                  guidance_scale=7.5, num_inference_steps=30, batch_size=4) -> list[tuple]:
    """The checks of :func:`generate_from_captions` that need no model, and its ``(source id, prompt, label)``s."""
    from fairbalance.core.fields import label_path

    validation.require_nonempty(samples)
    validation.require_positive_int("images_per_caption", images_per_caption)
    validation.require_fields(samples, [caption_field] + ([label_field] if label_field else []))
    fields = ["id", caption_field] + ([label_path(samples, label_field)] if label_field else [])
    rows = list(zip(*samples.values(fields)))
    prompts = [(r[0], c, r[2] if label_field else None) for r in rows for c in (r[1] or []) if c and c.strip()]
    if not prompts:
        raise validation.FairBalanceError(f"No captions in '{caption_field}'; nothing to generate")
    validation.require_positive_int("batch_size", batch_size)
    validation.require_positive_int("num_inference_steps", num_inference_steps)
    if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise validation.FairBalanceError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    return prompts


def validate_inputs(samples, target_dataset=None, **kwargs) -> None:
    """The up-front checks of a sharded :func:`generate_from_captions` (run by ``queue_sharded`` before queuing).

    The pipeline is not loaded here (each shard loads it).
    """
    import inspect

    require_own_target(samples, target_dataset)
    names = set(inspect.signature(_plan_prompts).parameters) - {"samples"}
    _plan_prompts(samples, **{k: v for k, v in kwargs.items() if k in names})
