"""Captions of chosen samples, and the DiffuBias text filter.

``compute_captions``: several diverse captions per image from any
transformers image-to-text model (BLIP, BLIP-2, GIT; chat-template
vision-language models get a short instruction), by sampling seeded per
image, so that a sharded run (``shard=``, ``num_shards=``) writes exactly
what one process would.

``filter_captions``: tokenize, drop English stopwords, count word
frequencies over the corpus, keep the top-F words (F = 2 x the number of
classes by default) and only the captions that contain at least one of them.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from fairbalance.core import claims, images, models, runs, sharding, validation, writeback

CAPTION_PROMPT = "Describe this image in one sentence."


def stopwords() -> tuple[frozenset[str], str]:
    """NLTK's English stopwords when its corpus is installed, else scikit-learn's list (ships offline)."""
    import nltk

    try:
        nltk.data.find("corpora/stopwords")
        from nltk.corpus import stopwords as sw

        return frozenset(sw.words("english")), "nltk"
    except LookupError:
        from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

        return frozenset(ENGLISH_STOP_WORDS), "scikit-learn"


def tokenize(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def _uses_chat_template(processor) -> bool:
    return bool(getattr(processor, "chat_template", None))


TOP_P = 0.9


def caption_seed(seed: int, filepath: str, index: int) -> int:
    """The seed of caption ``index`` of one image: a stable hash of the run's seed, the file path and the index.

    Each caption depends only on these, never on which batch, chunk or shard
    it is sampled in, nor on the process (Python's ``hash`` is salted per
    process, so it is not used). The file path, not the sample id, keys the
    image: a cloned or re-imported dataset gets the same captions.
    """
    digest = hashlib.sha256(f"{int(seed)}\0{filepath}\0{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: any value torch.Generator.manual_seed takes


class RowSeededSampler:
    """Top-k/top-p sampling with one random stream per generated row, as a ``generate`` logits processor.

    ``generate(do_sample=True)`` draws every row of a batch from one random
    stream, so a row's tokens would depend on the other rows of its batch.
    This processor samples each row itself by the Gumbel-max trick
    (``argmax(logits + Gumbel noise)`` is a draw from ``softmax(logits)``),
    the noise from the row's own generator, and leaves only the chosen token
    finite: generate's own draw then has a single token to pick. Row ``r``'s
    stream advances once per step whatever the other rows do.
    """

    def __init__(self, seeds: list[int], device, top_k: int | None, top_p: float, temperature: float | None):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        # CPU streams whatever the model's device: CUDA and CPU generators give other numbers for one seed, and
        # workers on other devices must write the same captions (the noise moves to the scores' device)
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        # HF's own warpers, in the order generate applies them when it samples
        self.warpers = ([TemperatureLogitsWarper(temperature)] if temperature not in (None, 1.0) else []) + \
                       ([TopKLogitsWarper(top_k)] if top_k else []) + [TopPLogitsWarper(top_p)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"{scores.shape[0]} rows for {len(self.generators)} random streams")
        scores = scores.float()
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        u = torch.stack([torch.rand(scores.shape[1], generator=g, device=g.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.to(scores.device).clamp_min(torch.finfo(torch.float32).tiny)))
        choice = (scores + gumbel).argmax(dim=1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)


def _to_device(cap: models.Captioner, inputs) -> dict:
    return {k: (v.to(cap.device, cap.dtype) if v.is_floating_point() else v.to(cap.device))
            for k, v in inputs.items()}


@torch.inference_mode()
def _caption_batch(cap: models.Captioner, pil_images, seeds: list[list[int]], max_new_tokens: int) -> list[list[str]]:
    """The captions of a batch of images: image ``i`` gets ``len(seeds[i])`` captions, caption ``k`` drawn
    from the random stream ``seeds[i][k]`` alone (one ``generate`` call for the whole batch).

    The caller's random state is left untouched.
    """
    from transformers import LogitsProcessorList

    proc = cap.processor
    chat = _uses_chat_template(proc)
    if chat:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
        inputs = proc(images=pil_images, text=[prompt] * len(pil_images), return_tensors="pt", padding=True)
    else:
        inputs = proc(images=pil_images, return_tensors="pt")
    inputs = _to_device(cap, inputs)
    num_captions = len(seeds[0])
    gen = cap.model.generation_config
    # generate repeats each input num_return_sequences times in a row: row i * num_captions + k
    top_k = getattr(gen, "top_k", None)
    sampler = RowSeededSampler([s for row in seeds for s in row], cap.device, 50 if top_k is None else top_k, TOP_P,
                               getattr(gen, "temperature", None))  # 50: generate's default top_k
    devices = [cap.device] if torch.device(cap.device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        out = cap.model.generate(**inputs, do_sample=True, num_beams=1, top_k=0, top_p=1.0, temperature=1.0,
                                 num_return_sequences=num_captions, max_new_tokens=max_new_tokens,
                                 logits_processor=LogitsProcessorList([sampler]))
    if chat and "input_ids" in inputs:
        out = out[:, inputs["input_ids"].shape[1]:]  # keep the answer only
    texts = [t.strip() for t in proc.batch_decode(out, skip_special_tokens=True)]
    return [texts[i * num_captions:(i + 1) * num_captions] for i in range(len(pil_images))]


def _caption_files(cap: models.Captioner, ids: list[str], paths: list[str], config: dict, batch_size: int,
                   pb) -> dict[str, list[str]]:
    """``{sample_id: captions}`` of these samples, ``batch_size`` images per ``generate`` call."""
    captions = {}
    for b in range(0, len(ids), batch_size):
        batch_paths = paths[b:b + batch_size]
        try:
            pil = [images.load_rgb(p) for p in batch_paths]
        except OSError as e:
            raise validation.FairBalanceError(str(e)) from e
        seeds = [[caption_seed(config["seed"], p, k) for k in range(config["num_captions"])] for p in batch_paths]
        for i, caps in zip(ids[b:b + batch_size], _caption_batch(cap, pil, seeds, config["max_new_tokens"])):
            captions[i] = caps
        pb.update(len(batch_paths))
    return captions


def validate_inputs(samples, num_captions=3, caption_field="captions", batch_size=16, max_new_tokens=30, seed=0,
                    **_) -> None:
    """The up-front checks of :func:`compute_captions` (also run by ``queue_sharded`` before queuing)."""
    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    validation.require_positive_int("num_captions", num_captions)
    validation.require_positive_int("batch_size", batch_size)
    validation.require_positive_int("max_new_tokens", max_new_tokens)
    validation.require_field_name(caption_field)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise validation.FairBalanceError(f"seed must be an integer, got {seed!r}")


@claims.exclusive
def compute_captions(
    samples,
    model: str = "Salesforce/blip-image-captioning-base",
    num_captions: int = 3,
    caption_field: str = "captions",
    batch_size: int = 16,
    max_new_tokens: int = 30,
    seed: int = 0,
    device: str | None = None,
    run_key: str = "captions",
    overwrite: bool = False,
    shard: int | None = None,
    num_shards: int | None = None,
    chunk_size: int = sharding.DEFAULT_CHUNK_SIZE,
    progress=None,
) -> "CaptionsResult | sharding.ShardResult":
    """Caption every sample of ``samples`` ``num_captions`` times; store a list of strings per sample.

    Each caption is sampled (top-p 0.9) from its own random stream,
    :func:`caption_seed` of ``seed``, the image's file path and the caption's
    index (:class:`RowSeededSampler`): the same image gets the same captions
    whatever its batch, ``batch_size``, view or shard (up to floating-point
    differences of batched model arithmetic, which can only matter at an
    exact tie between two tokens).

    ``shard``, ``num_shards``: caption only shard ``shard`` of ``num_shards``
    (see :mod:`fairbalance.core.sharding`; :func:`fairbalance.queue_sharded` queues
    all shards for delegated workers): chunks of ``chunk_size`` samples are
    written as they finish, a rerun skips the samples already captioned, and
    the last shard to finish records the run; returns a
    :class:`~fairbalance.core.sharding.ShardResult`.
    """
    import fiftyone.core.utils as fou

    validate_inputs(samples, num_captions, caption_field, batch_size, max_new_tokens, seed)
    if sharding.one_shard_requested(shard, num_shards, overwrite):
        return _compute_shard(samples, model, device, run_key, shard, num_shards, chunk_size, batch_size, progress,
                              num_captions=num_captions, max_new_tokens=max_new_tokens, seed=seed,
                              caption_field=caption_field)
    ids, paths = samples.values(["id", "filepath"])
    validation.require_image_files(paths)
    cap = models.load_captioner(model, device=device)
    config = _config(cap, num_captions, max_new_tokens, seed, caption_field)
    run = runs.prepare(samples, run_key, "captions", config, [caption_field], overwrite)
    with fou.ProgressBar(total=len(ids), progress=progress) as pb:
        captions = _caption_files(cap, ids, paths, config, batch_size, pb)
    run.write(lambda: writeback.set_values_by_id(samples, {caption_field: captions}, ids=ids))
    empty = sum(1 for c in captions.values() if not any(c))
    result = CaptionsResult(run_key, caption_field, len(ids), num_captions, empty)
    run.save_results(result.to_dict())
    return result


def _config(cap: models.Captioner, num_captions, max_new_tokens, seed, caption_field) -> dict:
    return {"model": cap.spec.to_dict(), "num_captions": num_captions, "max_new_tokens": max_new_tokens,
            "seed": seed, "caption_field": caption_field, "sampling": f"top_p={TOP_P}",
            "seeding": "per caption: sha256(seed, filepath, index), Gumbel-max"}


def _compute_shard(samples, model, device, run_key, shard, num_shards, chunk_size, batch_size, progress,
                   **settings) -> sharding.ShardResult:
    """One shard of a sharded captions run: chunks of samples captioned and written as they finish."""
    import fiftyone.core.utils as fou

    field = settings["caption_field"]
    ids, paths = samples.values(["id", "filepath"])
    path_of = dict(zip(ids, paths))
    validation.require_image_files([p for i, p in path_of.items() if sharding.shard_of(i, num_shards) == shard])
    cap = models.load_captioner(model, device=device)
    config = _config(cap, **settings)
    job = sharding.Shard(samples, run_key, "compute_captions", shard, num_shards, config, [field], done_field=field,
                         chunk_size=chunk_size)
    dataset = samples._root_dataset
    with fou.ProgressBar(total=max(job.total, 1), progress=progress) as pb:
        pb.update(job.resumed)
        for chunk in job.chunks():
            captions = _caption_files(cap, chunk, [path_of[i] for i in chunk], config, batch_size, pb)
            writeback.set_values_by_id(dataset.select(chunk), {field: captions}, ids=chunk)
            job.chunk_done(chunk)
    return job.finish()


def merge_shards(samples, job: dict) -> dict:
    """The results of a sharded captions run whose shards are all done: what the unsharded run records."""
    from fiftyone import ViewField as F

    cfg = job["config"]
    field = cfg["caption_field"]
    captioned = samples.exists(field)
    empty = captioned.match(F(field).filter(F() != "").length() == 0)
    return CaptionsResult(job["run_key"], field, len(captioned), cfg["num_captions"], len(empty)).to_dict()


@dataclass
class CaptionsResult:
    """How many samples were captioned, how often, and how many got only empty captions."""

    run_key: str
    caption_field: str
    num_samples: int
    num_captions: int
    num_empty: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaptionFilterResult:
    top_words: list[str]
    word_counts: dict[str, int]
    num_kept: int
    num_dropped: int
    dropped_examples: list[str]
    stopword_list: str
    run_key: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def top_words(captions: list[str], top_f: int, stop: frozenset[str]) -> tuple[list[str], Counter]:
    """The ``top_f`` most frequent non-stopword words (ties broken alphabetically)."""
    counts = Counter(w for c in captions for w in tokenize(c) if w not in stop and not w.isdigit())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:top_f]], counts


def keep_caption(caption: str, words: set[str]) -> bool:
    return any(w in words for w in tokenize(caption))


@claims.exclusive
def filter_captions(
    samples,
    caption_field: str = "captions",
    output_field: str = "filtered_captions",
    num_classes: int | None = None,
    label_field: str | None = None,
    top_f: int | None = None,
    run_key: str = "caption_filter",
    overwrite: bool = False,
) -> CaptionFilterResult:
    """Keep only captions containing one of the corpus's top-F non-stopword words.

    F is ``top_f``, else 2 x ``num_classes``, else 2 x the number of classes
    of ``label_field`` in the view. Samples whose captions are all dropped get
    an empty list. Nothing is written if no caption survives.
    """
    from fairbalance.core.fields import label_path

    validation.require_nonempty(samples)
    validation.require_fields(samples, [caption_field])
    if top_f is None:
        if num_classes is None:
            if label_field is None:
                raise validation.FairBalanceError("Pass top_f, num_classes or label_field")
            num_classes = len(samples.distinct(label_path(samples, label_field)))
        top_f = 2 * num_classes
    validation.require_positive_int("top_f", top_f)
    ids, lists = samples.values(["id", caption_field])
    have = [(i, c) for i, c in zip(ids, lists) if c]
    if not have:
        raise validation.FairBalanceError(f"No sample has captions in '{caption_field}'; compute captions first")
    stop, source = stopwords()
    corpus = [c for _, caps in have for c in caps]
    words, counts = top_words(corpus, top_f, stop)
    keep = set(words)
    kept = {i: [c for c in caps if keep_caption(c, keep)] for i, caps in have}
    n_kept = sum(len(v) for v in kept.values())
    dropped = [c for _, caps in have for c in caps if not keep_caption(c, keep)]
    if n_kept == 0:
        raise validation.FairBalanceError(f"No caption contains any of the top-{top_f} words {words}; nothing kept")
    run = runs.prepare(samples, run_key, "caption_filter", {
        "caption_field": caption_field, "output_field": output_field, "top_f": top_f, "stopwords": source},
        [output_field], overwrite)
    have_ids = [i for i, _ in have]
    run.write(lambda: writeback.set_values_by_id(samples.select(have_ids), {output_field: kept}, ids=have_ids))
    result = CaptionFilterResult(words, {w: counts[w] for w in words}, n_kept, len(dropped), dropped[:10], source,
                                 run_key)
    run.save_results(result.to_dict())
    return result
