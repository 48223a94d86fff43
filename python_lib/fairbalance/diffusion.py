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
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance import config as fb_config
from fairbalance import models, runs, training, validation, writeback

LABELS_FILE = "fairbalance_labels.json"
GENERATION_FILE = "fairbalance_generation.json"
STATE_DIR = "training_state"
MIN_IMAGES_PER_CLUSTER = 10


@dataclass
class DiffusionTrainConfig:
    label_field: str
    classes: list[str]
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
    def null_class(self) -> int:
        return len(self.classes)


def _build_unet(cfg: DiffusionTrainConfig):
    from diffusers import UNet2DModel

    n = len(cfg.block_out_channels)
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=3, out_channels=3, layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownBlock2D",) * (n - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
        norm_num_groups=min(32, cfg.block_out_channels[0]), num_class_embeds=len(cfg.classes) + 1,
    )


def _save_model(folder: str, unet, scheduler, cfg: DiffusionTrainConfig, step: int) -> None:
    os.makedirs(folder, exist_ok=True)
    unet.save_pretrained(os.path.join(folder, "unet"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, LABELS_FILE), "w") as f:
        json.dump({"config": asdict(cfg), "classes": cfg.classes, "null_class": cfg.null_class, "step": step}, f,
                  indent=1)


def train_conditional_diffusion(
    samples,
    label_field: str = "sa_cluster",
    output_dir: str | None = None,
    image_size: int = 32,
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
    """Train a class-conditional diffusion model on ``label_field``; returns the model folder.

    Images are resized to ``image_size`` (mixed sizes are fine). Clusters with
    fewer than 10 images are trained anyway, with a warning in the run results.
    With ``resume``, a rerun continues from the last checkpoint in
    ``output_dir`` (refused if that folder holds a different configuration
    or was trained on other images or labels; ``overwrite=True`` starts over).
    """
    import warnings

    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    ids, paths, y, classes, skipped = training._labels(samples, label_field, None)
    if len(classes) < 2:
        raise validation.FairBalanceError(f"'{label_field}' has a single cluster; nothing to balance")
    counts = np.bincount(y, minlength=len(classes))
    small = {classes[c]: int(n) for c, n in enumerate(counts) if n < MIN_IMAGES_PER_CLUSTER}
    if small:
        warnings.warn(f"clusters with fewer than {MIN_IMAGES_PER_CLUSTER} images: {small}")
    fingerprint = hashlib.sha1("\n".join(sorted(f"{p}\t{classes[c]}" for p, c in zip(paths, y))).encode())
    cfg = DiffusionTrainConfig(label_field, classes, image_size, epochs, batch_size, lr, cond_drop_prob,
                               tuple(block_out_channels), layers_per_block, seed=seed,
                               checkpoint_every=checkpoint_every, data_fingerprint=fingerprint.hexdigest())
    validation.require_positive_int("epochs", epochs)
    validation.require_positive_int("batch_size", batch_size)
    dataset = samples._root_dataset
    output_dir = os.path.abspath(output_dir or os.path.join(fb_config.data_dir(), "diffusion", dataset.name, run_key))
    state_dir = os.path.join(output_dir, STATE_DIR)
    start_step = 0
    saved_cfg = os.path.join(output_dir, LABELS_FILE)
    if os.path.isfile(saved_cfg):
        with open(saved_cfg) as f:
            previous = json.load(f)["config"]
        previous["block_out_channels"] = tuple(previous["block_out_channels"])
        same = {k: v for k, v in previous.items() if k != "epochs"} == {
            k: v for k, v in asdict(cfg).items() if k != "epochs"}
        if not same and not overwrite:
            raise validation.FairBalanceError(
                f"{output_dir} holds a diffusion model with another configuration or other training data; "
                "pass overwrite=True or choose another output_dir"
            )
        if not (resume and same):
            import shutil

            shutil.rmtree(output_dir)
    run = runs.prepare(samples, run_key, "conditional_diffusion",
                       {**asdict(cfg), "model_dir": output_dir, "resume": resume}, [], overwrite=True)

    accelerator = Accelerator(mixed_precision="fp16" if models.resolve_device(device).type == "cuda" else "no",
                              cpu=models.resolve_device(device).type == "cpu")
    gen = training.seed_everything(seed)
    x = training.load_images(paths, image_size)  # resized, in [-1, 1]
    data = torch.utils.data.TensorDataset(x, torch.as_tensor(y))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen, drop_last=False)
    unet = _build_unet(cfg)
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                              prediction_type=cfg.prediction_type)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    unet, opt, loader = accelerator.prepare(unet, opt, loader)
    ema.to(accelerator.device)
    if resume and os.path.isdir(state_dir):
        accelerator.load_state(state_dir)
        ema.load_state_dict(torch.load(os.path.join(state_dir, "ema.pt"), weights_only=False))
        with open(os.path.join(state_dir, "step.json")) as f:
            start_step = json.load(f)["step"]
    steps_per_epoch = len(loader)
    total_steps = epochs * steps_per_epoch
    step = start_step

    def checkpoint():
        accelerator.save_state(state_dir)
        torch.save(ema.state_dict(), os.path.join(state_dir, "ema.pt"))
        with open(os.path.join(state_dir, "step.json"), "w") as f:
            json.dump({"step": step}, f)
        ema_unet = _build_unet(cfg)
        ema.copy_to(ema_unet.parameters())
        _save_model(output_dir, ema_unet, scheduler, cfg, step)

    import fiftyone.core.utils as fou

    losses = []
    noise_gen = torch.Generator(device="cpu").manual_seed(seed + start_step)
    with fou.ProgressBar(total=total_steps, progress=progress) as pb:
        pb.update(min(start_step, total_steps))
        while step < total_steps:
            unet.train()
            for xb, yb in loader:
                if step >= total_steps:
                    break
                noise = torch.randn(xb.shape, generator=noise_gen).to(xb.device)
                t = torch.randint(0, cfg.num_train_timesteps, (len(xb),), generator=noise_gen).to(xb.device)
                drop = torch.rand(len(yb), generator=noise_gen).to(yb.device) < cond_drop_prob
                labels = torch.where(drop, torch.full_like(yb, cfg.null_class), yb)
                noisy = scheduler.add_noise(xb, noise, t)
                with accelerator.autocast():
                    pred = unet(noisy, t, class_labels=labels).sample
                target = noise if cfg.prediction_type == "epsilon" else scheduler.get_velocity(xb, noise, t)
                loss = F.mse_loss(pred.float(), target.float())
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.step(accelerator.unwrap_model(unet).parameters())
                losses.append(float(loss.detach()))
                step += 1
                pb.update()
                if step % checkpoint_every == 0:
                    checkpoint()
    checkpoint()
    run.write(lambda: None)
    run.save_results({
        "model_dir": output_dir, "steps": step, "resumed_from_step": start_step,
        "final_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
        "cluster_sizes": {classes[c]: int(n) for c, n in enumerate(counts)}, "small_clusters": small,
        "num_skipped": skipped,
    })
    return output_dir


@dataclass
class ConditionalDiffusionModel:
    unet: torch.nn.Module
    classes: list[str]
    null_class: int
    config: dict
    folder: str
    step: int = 0


def load_conditional_diffusion(folder: str, device=None) -> ConditionalDiffusionModel:
    """Load a model saved by :func:`train_conditional_diffusion`."""
    from diffusers import UNet2DModel

    path = os.path.join(folder, LABELS_FILE)
    if not os.path.isfile(path):
        raise models.ModelNotFoundError(f"No conditional diffusion model in {folder} ({LABELS_FILE} missing)")
    with open(path) as f:
        meta = json.load(f)
    unet = UNet2DModel.from_pretrained(os.path.join(folder, "unet")).to(models.resolve_device(device)).eval()
    return ConditionalDiffusionModel(unet, meta["classes"], meta["null_class"], meta["config"], os.path.abspath(folder),
                                     int(meta.get("step", 0)))


@torch.inference_mode()
def sample_images(model: ConditionalDiffusionModel, labels: list[int], seeds: list[int], guidance_scale: float = 3.0,
                  num_inference_steps: int = 50, scheduler: str = "ddim") -> np.ndarray:
    """Generate one image per (label, seed) with classifier-free guidance; uint8 N x H x W x 3."""
    from diffusers import DDIMScheduler, DDPMScheduler

    folder = os.path.join(model.folder, "scheduler")
    sched = (DDIMScheduler if scheduler == "ddim" else DDPMScheduler).from_pretrained(folder)
    sched.set_timesteps(num_inference_steps)
    dev = next(model.unet.parameters()).device
    size = model.unet.config.sample_size
    x = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(dev)
    cond = torch.as_tensor(labels, device=dev)
    null = torch.full_like(cond, model.null_class)
    step_gens = [torch.Generator().manual_seed(s + 1) for s in seeds]  # per-image noise: batch-independent
    for t in sched.timesteps:
        # the model's prediction (v or epsilon, as trained; the scheduler config says which), guided
        pred = model.unet(torch.cat([x, x]), t, class_labels=torch.cat([cond, null])).sample
        pred_c, pred_u = pred.chunk(2)
        pred = pred_u + guidance_scale * (pred_c - pred_u)
        if scheduler == "ddim":
            x = sched.step(pred, t, x, eta=0.0).prev_sample
        else:
            x = sched.step(pred, t, x, generator=step_gens).prev_sample
    img = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return img


def plan_counts(counts: dict[str, int], mode: str = "equal", total: int | None = None,
                per_class: int | None = None) -> dict[str, int]:
    """How many images to generate per cluster.

    ``equal``: ``per_class`` each, or ``total // M`` each (the paper: 2000/M);
    ``fill``: up to the size of the largest cluster.
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
    raise validation.FairBalanceError("mode must be 'equal' or 'fill'")


def generate_balanced(
    samples,
    label_field: str = "sa_cluster",
    model: str | None = None,
    total: int | None = None,
    per_class: int | None = None,
    mode: str = "equal",
    guidance_scale: float = 3.0,
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
    """Generate images per cluster and add them as samples with provenance.

    New samples get ``generated=True``, ``label_field`` (the cluster),
    ``generation`` (model, guidance, steps, sampler, seed, mode) and the tag
    ``generated``; files go to ``output_dir``. Image ``i`` of cluster ``c``
    always has the same seed, so a rerun adds nothing twice and an
    interrupted run continues where it stopped. An ``output_dir`` that holds
    images of another model or sampler setting is refused; ``overwrite=True``
    deletes those images and their samples first. Returns the counts added.
    """
    import fiftyone as fo
    from PIL import Image

    from fairbalance.balance import label_path

    validation.require_nonempty(samples)
    if model is None:
        raise validation.FairBalanceError("model: pass the folder returned by train_conditional_diffusion")
    diff = load_conditional_diffusion(model, device)
    if diff.config["label_field"] != label_field:
        raise validation.FairBalanceError(
            f"The model was trained on '{diff.config['label_field']}', not '{label_field}'")
    from fiftyone import ViewField as Fv

    path = label_path(samples, label_field)
    real = samples.match(Fv("generated") != True) if samples._root_dataset.has_field("generated") else samples  # noqa
    counts = {c: real.count_values(path).get(c, 0) for c in diff.classes}
    plan = plan_counts(counts, mode, total, per_class)
    target, output_dir = writeback.generation_target(samples, target_dataset, output_dir, run_key)
    provenance = {"model": diff.folder, "guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps,
                  "scheduler": scheduler, "mode": mode, "run_key": run_key}
    _claim_output_dir(output_dir, target, {
        "model": diff.folder, "model_step": diff.step, "label_field": label_field, "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps, "scheduler": scheduler}, overwrite)
    existing = set(target.values("filepath")) if len(target) else set()
    jobs = []
    for ci, c in enumerate(diff.classes):
        for i in range(plan[c]):
            fp = os.path.join(output_dir, f"cluster{c}_seed{seed}_{i:05d}.png")
            if fp not in existing:
                jobs.append((ci, c, seed * 1_000_003 + ci * 100_003 + i, fp))
    import fiftyone.core.utils as fou

    added = {c: 0 for c in diff.classes}
    with fou.ProgressBar(total=len(jobs), progress=progress) as pb:
        for b in range(0, len(jobs), batch_size):
            batch = jobs[b : b + batch_size]
            todo = [j for j in batch if not os.path.isfile(j[3])]
            if todo:
                imgs = sample_images(diff, [j[0] for j in todo], [j[2] for j in todo], guidance_scale,
                                     num_inference_steps, scheduler)
                for (ci, c, s, fp), img in zip(todo, imgs):
                    tmp = fp + ".tmp.png"
                    Image.fromarray(img).save(tmp)
                    os.replace(tmp, fp)
            new = []
            for ci, c, s, fp in batch:
                new.append(fo.Sample(filepath=fp, tags=["generated"], generated=True,
                                     generation={**provenance, "seed": s, "cluster": c},
                                     **{label_field: fo.Classification(label=c)}))
                added[c] += 1
            target.add_samples(new, progress=False)
            pb.update(len(batch))
    result = {"added": added, "planned": plan, "output_dir": output_dir, "target_dataset": target.name}
    run = runs.prepare(target, run_key, "generate_balanced", {**provenance, "label_field": label_field,
                       "total": total, "per_class": per_class, "seed": seed}, [], overwrite=True)
    run.write(lambda: None)
    run.save_results(result)
    return result


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
    images_there = glob.glob(os.path.join(folder, "cluster*_seed*.png"))
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
        samples._root_dataset.untag_samples(tag)
        samples.select(low).tag_samples(tag)

    run.write(write)
    result = {"num_scored": len(scores), "num_tagged": len(low), "cut": cut,
              "mean_score": float(values.mean())}
    run.save_results(result)
    return result
