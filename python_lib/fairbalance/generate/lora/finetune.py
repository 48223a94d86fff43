"""Fine-tuning one LoRA adapter per group (or per cluster of a group): :func:`finetune_per_group`.

Basu et al., "Harnessing Diffusion-Generated Synthetic Images for Fair Image
Classification": fine-tune a diffusion model on the images of each group
(LoRA, DreamBooth), or on each cluster of a group's images with its own
token (Clustered DreamBooth). The adapters, their files and base models are
:mod:`fairbalance.generate.lora.adapters`; this module trains them and records the run.

- the project's class-conditional diffusion model: ``method="lora"``
  fine-tunes the adapter under each group's own condition, so guidance keeps
  working; ``method="dreambooth"`` under the null condition, so the adapter
  alone stands for the group (its "token");
- a Stable Diffusion pipeline: ``method="lora"`` prompts with the group's
  name, ``"dreambooth"`` with a rare token per adapter
  (``"a photo of sks1 person"``), prior preservation optional
  (``prior_loss_weight``: images of the prompt without the token, drawn from
  the base pipeline, keep their loss).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from fairbalance.core import distributed, folders, runs, validation
from fairbalance.core.data import load_images
from fairbalance.generate.lora.adapters import (MANIFEST_FILE, METHODS, MIN_IMAGES_PER_GROUP, PRIOR_STEPS, add_adapter,
                                                LoraBase, cluster_features, delete_adapter, group_fields, load_base,
                                                model_condition, read_meta, real_groups, save_adapter, activate,
                                                base_kind, group_key, require_peft)


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


@runs.writer("finetune_per_group", resumable=True)
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
    (:mod:`fairbalance.core.distributed`).
    """
    require_peft()
    distributed.setup(device)
    progress = distributed.progress_for(progress)

    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    if method not in METHODS:
        raise validation.FairBalanceError(f"method must be one of {METHODS}, not {method!r}")
    fields = group_fields(group_field)
    validation.require_fields(samples, fields + ([embeddings_field] if embeddings_field else []))
    _check_settings(rank, steps, batch_size, clusters_per_group, min_images, num_prior_images, lr, prior_loss_weight,
                    resolution, token_prefix)
    base_name = os.fspath(runs.given_or_recorded(samples, base_model, base_model_run, "conditional_diffusion",
                                                 "model_dir", "base_model (a model folder or hub id)",
                                                 "base_model_run"))
    _check_prompt(base_kind(base_name), prompt, method, prior_loss_weight)
    ids, paths, values, skipped = real_groups(samples, fields)
    if not ids:
        raise validation.FairBalanceError(f"No real sample of the view has every field of {fields}")
    base = load_base(base_name, distributed.device(device), for_training=True)
    if base.kind == "conditional":
        _check_conditional_groups(base, method, fields, values)
    order, members, plans = _plan_adapters(samples, ids, paths, values, base, clusters_per_group, embeddings_field,
                                           resolution, seed)
    config = {"group_fields": fields, "clusters_per_group": clusters_per_group, "method": method,
              "base_model": base.name, "base_kind": base.kind, "base_fingerprint": base.fingerprint, "rank": rank,
              "steps": steps, "lr": lr, "batch_size": batch_size, "prompt": prompt if base.kind != "conditional" else None,
              "token_prefix": token_prefix, "prior_loss_weight": prior_loss_weight,
              "num_prior_images": num_prior_images, "embeddings_field": embeddings_field, "resolution": resolution,
              "seed": seed, "data_fingerprint": _data_fingerprint(paths, values)}
    output_dir = os.path.abspath(output_dir or folders.default_folder("adapters", samples._root_dataset.name, run_key))
    recorded = {("finetune_method" if k == "method" else k): v for k, v in config.items()}  # "method": the run's

    # the main process only; the others wait for it (and raise its error). finished: whether this run finished
    # before (a rerun then records nothing), known on the main process
    run, finished = distributed.on_main(_prepare_run, samples, run_key, recorded, output_dir, overwrite, config,
                                        plans) or (None, False)
    small = _small_groups(order, members, min_images)
    adapters, trained, reused = _train_adapters(base, plans, paths, fields, output_dir, method, rank, steps, lr,
                                                batch_size, resolution, prior_loss_weight, num_prior_images, prompt,
                                                token_prefix, seed, progress)
    result = FinetuneResult(run_key, output_dir, method, base.name, base.kind, base.fingerprint, fields, rank, steps,
                            adapters, small, trained, reused, base.num_bytes, skipped)

    def record():
        if not trained and finished:
            return  # a finished run rerun: nothing trained, so neither its record nor its manifest is rewritten
        _write_manifest(output_dir, config, adapters)
        run.write(lambda: None)
        run.save_results(result.to_dict())

    distributed.on_main(record)
    return result


def _train_adapters(base, plans, paths, fields, output_dir, method, rank, steps, lr, batch_size, resolution,
                    prior_loss_weight, num_prior_images, prompt, token_prefix, seed, progress):
    """Train (or reuse, when its folder holds the same one) each planned adapter; the adapters' records, how many
    were trained and how many reused."""
    import fiftyone.core.utils as fou

    adapters, trained, reused = [], 0, 0
    with fou.ProgressBar(total=steps * len(plans), progress=progress) as pb:
        for n, (gi, v, ci, idx) in enumerate(plans):
            name = f"g{gi}c{ci}"
            meta = _adapter_meta(name, n, v, ci, idx, base, fields, method, rank, steps, token_prefix, prompt)
            folder = os.path.join(output_dir, name)
            done = distributed.on_main(read_meta, folder, share=True)  # one view of what is done
            if done is not None and {k: done.get(k) for k in meta} == meta:
                adapters.append({**done, "folder": folder})
                reused += 1
                pb.update(steps)
                continue
            t0 = time.time()
            torch.manual_seed(seed * 1_000_003 + n)  # the adapter's initial weights: the same in every process
            add_adapter(base, name, rank)
            _train_adapter(base, meta, [paths[j] for j in idx], steps, lr, batch_size, resolution, prior_loss_weight,
                           num_prior_images, prompt, seed * 1_000_003 + n, pb)
            seconds = time.time() - t0
            meta["seconds"] = seconds
            meta["adapter_bytes"] = distributed.on_main(save_adapter, base, name, folder, meta, share=True)
            delete_adapter(base, name)
            adapters.append({**meta, "folder": folder})
            trained += 1
    return adapters, trained, reused


def _small_groups(order, members, min_images) -> dict:
    """The groups with fewer than ``min_images`` images (trained anyway, with a warning)."""
    small = {group_key(v): len(members[v]) for v in order if len(members[v]) < min_images}
    if small:
        warnings.warn(f"{len(small)} group(s) have fewer than {min_images} images (trained anyway): "
                      + ", ".join(f"{k}: {n}" for k, n in list(small.items())[:10]))
    return small


def _prepare_run(samples, run_key, recorded, output_dir, overwrite, config, plans):
    """The run (prepared), the output folder claimed and its entries listed, and whether this run finished
    before; a folder not finished gets this configuration's incomplete manifest."""
    run = runs.prepare(samples, run_key, "finetune_per_group", {**recorded, "output_dir": output_dir}, [],
                       overwrite, rerun_same_config=True)
    folders.claim_output_folder(output_dir, samples._root_dataset, run_key)  # this run's of this dataset alone
    _claim_adapter_folder(output_dir, config, overwrite)
    folders.record(output_dir, [MANIFEST_FILE, MANIFEST_FILE + ".tmp"] + [f"g{p[0]}c{p[2]}" for p in plans])
    finished = run.resumed and _read_manifest_complete(output_dir)
    if not finished:
        _write_manifest(output_dir, config, [], complete=False)  # marks the folder as this configuration's
    return run, finished


def _data_fingerprint(paths, values) -> str:
    """A hash of the training images and their groups: a rerun resumes only on the same data."""
    return hashlib.sha1("\n".join(sorted(f"{p}\t{group_key(v)}" for p, v in zip(paths, values))).encode()).hexdigest()


def _check_prompt(kind, prompt, method, prior_loss_weight) -> None:
    """The prompt template (Stable Diffusion bases) or no prior loss (conditional bases)."""
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


def _check_settings(rank, steps, batch_size, clusters_per_group, min_images, num_prior_images, lr, prior_loss_weight,
                    resolution, token_prefix) -> None:
    """The counts, rates and the token prefix, before the base model is looked up."""
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


def _check_conditional_groups(base, method, fields, values) -> None:
    """On a conditional base, ``method="lora"`` trains each adapter under its group's condition: the groups must
    name the model's condition fields, with values it was trained on."""
    need = [base.diff.label_field] + ([base.diff.attribute_field] if base.diff.attribute_field else [])
    if method == "lora" and not set(need) <= set(fields):
        raise validation.FairBalanceError(
            f"method='lora' on this conditional model trains each adapter under its group's condition: "
            f"group_field must include {need}, got {fields}")
    if method == "lora":
        unknown = sorted({group_key(v) for v in values if model_condition(base.diff, dict(zip(fields, v))) is None})
        if unknown:
            raise validation.FairBalanceError(
                f"groups {unknown[:5]} have values the base model was not trained on")


def _plan_adapters(samples, ids, paths, values, base, clusters_per_group, embeddings_field, resolution, seed):
    """The plan: groups in order, their members, and one ``(group index, group values, cluster, member indices)``
    per adapter (deterministic for the same data and seed)."""
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
            feats = load_images(paths, _base_size(base, resolution), progress=False).flatten(1).numpy()
        for gi, v in enumerate(order):
            idx = np.array(members[v])
            cluster_of[idx] = cluster_features(feats[idx], clusters_per_group, seed + gi)
    plans = []
    for gi, v in enumerate(order):
        for ci in sorted(set(cluster_of[members[v]].tolist())):
            idx = [j for j in members[v] if cluster_of[j] == ci]
            plans.append((gi, v, ci, idx))
    return order, members, plans


def _adapter_meta(name, n, v, ci, idx, base, fields, method, rank, steps, token_prefix, prompt) -> dict:
    """What an adapter's folder records: its group, cluster, token, prompt and condition, and how it is trained
    (compared with a folder's own record to reuse an adapter trained before)."""
    token = f"{token_prefix}{n + 1}" if method == "dreambooth" and base.kind != "conditional" else None
    group = group_key(v)
    meta = {"name": name, "group": group, "group_values": dict(zip(fields, v)), "cluster": ci,
            "token": token, "num_images": len(idx), "method": method, "rank": rank, "steps": steps,
            "base_kind": base.kind, "base_fingerprint": base.fingerprint,
            "prompt": _prompt(prompt, token, group) if base.kind != "conditional" else None,
            "condition": None}
    if base.kind == "conditional" and method == "lora":
        meta["condition"] = list(model_condition(base.diff, dict(zip(fields, v))))
    return meta


def _prompt(template: str, token: str | None, group: str) -> str:
    return " ".join(template.format(token=token or "", group=group).split())


def _base_size(base: LoraBase, resolution: int | None) -> list[int]:
    if base.kind == "conditional":
        s = base.unet.config.sample_size
        return [s, s] if isinstance(s, int) else list(s)
    s = resolution or base.unet.config.sample_size * base.pipe.vae_scale_factor
    return [s, s]


def _claim_adapter_folder(folder: str, config: dict, overwrite: bool) -> None:
    """Refuse a folder holding adapters of another configuration unless ``overwrite`` (which deletes them):
    :func:`folders.claim_setting` with the configuration its manifest records."""
    manifest = os.path.join(folder, MANIFEST_FILE)
    previous = None
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                previous = json.load(f).get("config")
        except (OSError, ValueError):
            previous = {"unreadable": True}
    others = [d for d in (os.listdir(folder) if os.path.isdir(folder) else [])
              if d != MANIFEST_FILE and not d.startswith((folders.OWNER_FILE, folders.LIST_FILE))]
    replaced = folders.claim_setting(folder, previous, runs.jsonable(config), overwrite,
                                     unknown=0 if previous is not None else len(others), kind="adapters")
    if overwrite and not replaced and os.path.isdir(folder):  # the same configuration: overwrite starts over
        folders.remove_listed(folder)
    validation.require_writable_dir(folder)


def _read_manifest_complete(folder: str) -> bool:
    try:
        with open(os.path.join(folder, MANIFEST_FILE)) as f:
            return bool(json.load(f).get("complete"))
    except (OSError, ValueError):
        return False


def _write_manifest(folder: str, config: dict, adapters: list[dict], complete: bool = True) -> None:
    tmp = os.path.join(folder, MANIFEST_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"config": runs.jsonable(config), "complete": complete,
                   "adapters": [{k: v for k, v in a.items() if k != "folder"} for a in adapters]}, f, indent=1)
    os.replace(tmp, os.path.join(folder, MANIFEST_FILE))


def _train_adapter(base: LoraBase, meta: dict, paths: list[str], steps: int, lr: float, batch_size: int,
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


def _conditional_step(base: LoraBase, meta: dict, paths, gen, dev):
    from diffusers import DDPMScheduler

    diff = base.diff
    sched = DDPMScheduler.from_pretrained(os.path.join(diff.folder, "scheduler"))
    x = load_images(paths, _base_size(base, None), scale="symmetric", progress=False)
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


def _sd_step(base: LoraBase, meta: dict, paths, resolution, prior_loss_weight, num_prior_images, prompt, gen, dev):
    from diffusers import DDPMScheduler

    pipe = base.pipe
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    size = _base_size(base, resolution)
    scale = pipe.vae.config.scaling_factor

    def latents(pixels):
        with torch.no_grad():
            return torch.cat([pipe.vae.encode(pixels[b:b + 16].to(dev)).latent_dist.sample(gen) * scale
                              for b in range(0, len(pixels), 16)])

    inst = latents(load_images(paths, size, scale="symmetric", progress=False))
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
