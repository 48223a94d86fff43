"""Text-to-image generation from (filtered) captions, added to the dataset with provenance (DiffuBias)."""

from __future__ import annotations

import hashlib
import os
import warnings

import torch

from fairbalance import models, runs, validation, writeback


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
    progress=None,
) -> dict:
    """Generate images from each sample's captions and add them as new samples.

    Each image gets ``generated=True``, ``generation`` (prompt, seed, model,
    source sample id, guidance, steps) and the tag ``generated``; the label of
    ``label_field`` is copied from the source sample. Every image's seed
    derives from (seed, source, prompt, k), so reruns add nothing twice and
    an interrupted run resumes. ``safety_checker=False`` removes the
    pipeline's NSFW checker explicitly (it blacks out images it flags).
    Prompts longer than the text encoder's limit are truncated with a warning.
    """
    import fiftyone as fo
    import fiftyone.core.utils as fou

    validation.require_nonempty(samples)
    validation.require_fields(samples, [caption_field] + ([label_field] if label_field else []))
    validation.require_positive_int("images_per_caption", images_per_caption)
    from fairbalance.balance import label_path

    fields = ["id", caption_field] + ([label_path(samples, label_field)] if label_field else [])
    rows = list(zip(*samples.values(fields)))
    prompts = [(r[0], c, r[2] if label_field else None) for r in rows for c in (r[1] or []) if c and c.strip()]
    if not prompts:
        raise validation.FairBalanceError(f"No captions in '{caption_field}'; nothing to generate")
    target, output_dir = writeback.generation_target(samples, target_dataset, output_dir, run_key)

    kwargs = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
    pipe = models.load_diffusion_pipeline(model, device=device, **kwargs)
    if attention_slicing:  # lower peak memory on small GPUs; SDPA attention is the default otherwise
        pipe.enable_attention_slicing()
    spec = getattr(pipe, "fairbalance_spec", None)
    jobs = []
    existing = set(target.values("filepath")) if len(target) else set()
    for src, prompt, label in prompts:
        for k in range(images_per_caption):
            s = _prompt_seed(seed, src, prompt, k)
            fp = os.path.join(output_dir, f"{src}_{s:012x}.png")
            if fp not in existing:
                jobs.append((src, prompt, label, s, fp))
    provenance = {"model": spec.to_dict() if spec else model, "guidance_scale": guidance_scale,
                  "num_inference_steps": num_inference_steps, "run_key": run_key}
    added = 0
    with fou.ProgressBar(total=len(jobs), progress=progress) as pb:
        for b in range(0, len(jobs), batch_size):
            batch = jobs[b:b + batch_size]
            todo = [j for j in batch if not os.path.isfile(j[4])]
            if todo:
                gens = [torch.Generator(device="cpu").manual_seed(j[3]) for j in todo]
                out = pipe(_truncate(pipe, [j[1] for j in todo]), guidance_scale=guidance_scale,
                           num_inference_steps=num_inference_steps, generator=gens, height=height, width=width,
                           output_type="pil")
                for j, img in zip(todo, out.images):
                    tmp = j[4] + ".tmp.png"
                    img.convert("RGB").save(tmp)
                    os.replace(tmp, j[4])
            new = []
            for src, prompt, label, s, fp in batch:
                extra = {label_field: fo.Classification(label=str(label))} if label_field and label is not None else {}
                new.append(fo.Sample(filepath=fp, tags=["generated"], generated=True,
                                     generation={**provenance, "prompt": prompt, "seed": s, "source_id": src},
                                     **extra))
            target.add_samples(new, progress=False)
            added += len(new)
            pb.update(len(batch))
    result = {"num_prompts": len(prompts), "num_added": added, "output_dir": output_dir, "target_dataset": target.name}
    run = runs.prepare(target, run_key, "text_to_image", {**provenance, "caption_field": caption_field,
                       "images_per_caption": images_per_caption, "seed": seed, "label_field": label_field,
                       "safety_checker": safety_checker}, [], overwrite=True)
    run.write(lambda: None)
    run.save_results(result)
    return result
