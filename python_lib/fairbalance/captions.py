"""Captions of chosen samples, and the DiffuBias text filter.

``compute_captions``: several diverse captions per image from any
transformers image-to-text model (BLIP, BLIP-2, GIT; chat-template
vision-language models get a short instruction), by seeded sampling.

``filter_captions``: tokenize, drop English stopwords, count word
frequencies over the corpus, keep the top-F words (F = 2 x the number of
classes by default) and only the captions that contain at least one of them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from fairbalance import claims, images, models, runs, validation, writeback

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


@torch.inference_mode()
def _caption_batch(cap: models.Captioner, pil_images, num_captions: int, max_new_tokens: int, seed: int):
    proc = cap.processor
    if _uses_chat_template(proc):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
        prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
        inputs = proc(images=pil_images, text=[prompt] * len(pil_images), return_tensors="pt", padding=True)
    else:
        inputs = proc(images=pil_images, return_tensors="pt")
    inputs = {k: (v.to(cap.device, cap.dtype) if v.is_floating_point() else v.to(cap.device))
              for k, v in inputs.items()}
    torch.manual_seed(seed)
    out = cap.model.generate(**inputs, do_sample=True, top_p=0.9, num_return_sequences=num_captions,
                             max_new_tokens=max_new_tokens)
    if _uses_chat_template(proc) and "input_ids" in inputs:
        out = out[:, inputs["input_ids"].shape[1]:]  # keep the answer only
    texts = [t.strip() for t in proc.batch_decode(out, skip_special_tokens=True)]
    return [texts[i * num_captions:(i + 1) * num_captions] for i in range(len(pil_images))]


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
    progress=None,
) -> "CaptionsResult":
    """Caption every sample of ``samples`` ``num_captions`` times; store a list of strings per sample."""
    import fiftyone.core.utils as fou

    validation.require_nonempty(samples)
    validation.require_image_collection(samples)
    validation.require_positive_int("num_captions", num_captions)
    validation.require_positive_int("batch_size", batch_size)
    ids, paths = samples.values(["id", "filepath"])
    validation.require_image_files(paths)
    cap = models.load_captioner(model, device=device)
    run = runs.prepare(samples, run_key, "captions", {
        "model": cap.spec.to_dict(), "num_captions": num_captions, "max_new_tokens": max_new_tokens, "seed": seed,
        "caption_field": caption_field, "sampling": "top_p=0.9"}, [caption_field], overwrite)
    captions = {}
    with fou.ProgressBar(total=len(ids), progress=progress) as pb:
        for b in range(0, len(ids), batch_size):
            batch_paths = paths[b:b + batch_size]
            try:
                pil = [images.load_rgb(p) for p in batch_paths]
            except OSError as e:
                raise validation.FairBalanceError(str(e)) from e
            for j, caps in enumerate(_caption_batch(cap, pil, num_captions, max_new_tokens, seed + b)):
                captions[ids[b + j]] = caps
            pb.update(len(batch_paths))
    run.write(lambda: writeback.set_values_by_id(samples, {caption_field: captions}, ids=ids))
    empty = sum(1 for c in captions.values() if not any(c))
    result = CaptionsResult(run_key, caption_field, len(ids), num_captions, empty)
    run.save_results(result.to_dict())
    return result


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
    from fairbalance.balance import label_path

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
