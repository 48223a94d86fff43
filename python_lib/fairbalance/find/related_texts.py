"""Related texts for a text-specified sensitive attribute (Suayama & Nakamura, III-B).

Every WordNet noun synset h gives ``W_h+ = "<lemma>, which means <gloss>"``;
the attribute and its optional values give ``W_SA = "<attribute> such as
<v1>, <v2>"``. The k candidates closest to ``W_SA`` in CLIP text space are the
related texts. Candidate embeddings are cached on disk per model, so a new
attribute costs one text encode and one matrix product.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from fairbalance.core import config, validation
from fairbalance.find import resources
from fairbalance.core.models import ClipModel

GLOSS_FORMAT = "{lemma}, which means {gloss}"
CACHE_VERSION = 1


@dataclass
class RelatedText:
    text: str
    score: float | None
    synset: str | None = None


def attribute_query(attribute: str, values: list[str] | None = None) -> str:
    """``W_SA``: the attribute alone, or ``"<attribute> such as v1, v2"``."""
    attribute = (attribute or "").strip()
    if not attribute:
        raise validation.FairBalanceError("The sensitive attribute text is empty")
    values = [v.strip() for v in (values or []) if v and v.strip()]
    return f"{attribute} such as {', '.join(values)}" if values else attribute


def wordnet_candidates() -> tuple[list[str], list[str]]:
    """``(texts, synset ids)`` of every WordNet noun as ``W_h+``."""
    glosses = resources.noun_glosses()
    return [GLOSS_FORMAT.format(lemma=g.lemma, gloss=g.gloss) for g in glosses], [g.synset for g in glosses]


def _cache_path(clip: ClipModel) -> str:
    key = json.dumps(
        {"model": clip.spec.to_dict(), "wordnet": resources.wordnet_version(), "format": GLOSS_FORMAT,
         "version": CACHE_VERSION},
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(config.cache_dir(), "gloss_embeddings", f"{digest}.npy")


def gloss_embeddings(clip: ClipModel, batch_size: int = 256, progress=None) -> np.ndarray:
    """L2-normalized CLIP text embeddings of all WordNet ``W_h+`` texts (disk-cached per model)."""
    path = _cache_path(clip)
    texts, _ = wordnet_candidates()
    if os.path.isfile(path):
        emb = np.load(path, mmap_mode="r")
        if emb.shape[0] == len(texts):
            return emb
    import fiftyone.core.utils as fou

    tokens = gloss_tokens(clip, texts)
    chunks = []
    step = 32 * batch_size  # large chunks: encode_text groups texts of similar length inside each
    with fou.ProgressBar(total=len(texts), progress=progress) as pb:
        for i in range(0, len(texts), step):
            chunk = tokens[i : i + step]
            chunks.append(clip.encode_text(chunk, batch_size=batch_size).numpy().astype(np.float16))
            pb.update(len(chunk))
    emb = np.concatenate(chunks)
    _save_atomically(path, emb)
    return emb


def gloss_tokens(clip: ClipModel, texts: list[str]):
    """``clip.tokenizer(texts)``, disk-cached for open_clip's BPE tokenizer (~20 s of CPU for WordNet's 82k texts).

    The cache (``<cache_dir>/gloss_tokens``) is keyed by the texts and the
    tokenizer's vocabulary and settings, not by the model: CLIP models that
    share a tokenizer share it. Other tokenizers are run every time.
    """
    import torch

    key = _tokenizer_key(clip.tokenizer)
    if key is None:
        return clip.tokenizer(list(texts))
    digest = hashlib.sha256(key.encode())
    digest.update("\n".join(texts).encode())
    path = os.path.join(config.cache_dir(), "gloss_tokens", f"{digest.hexdigest()[:16]}.npy")
    if os.path.isfile(path):
        tokens = np.load(path)
        if tokens.shape[0] == len(texts):
            return torch.from_numpy(tokens.astype(np.int64))
    tokens = clip.tokenizer(list(texts))
    small = tokens.numpy().astype(np.uint16 if int(tokens.max()) < 2**16 else np.int32)
    _save_atomically(path, small)
    return tokens


def _tokenizer_key(tokenizer) -> str | None:
    """What open_clip's ``SimpleTokenizer`` output depends on (vocabulary, merges, settings); None for others."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:  # pragma: no cover (open_clip is a dependency)
        return None
    if type(tokenizer) is not SimpleTokenizer:
        return None
    merges = sorted(tokenizer.bpe_ranks.items(), key=lambda kv: kv[1])
    vocab = sorted(tokenizer.encoder.items(), key=lambda kv: kv[1])
    settings = [tokenizer.context_length, tokenizer.sot_token_id, tokenizer.eot_token_id,
                getattr(tokenizer.clean_fn, "__name__", repr(tokenizer.clean_fn)),
                getattr(tokenizer.reduction_fn, "__name__", repr(tokenizer.reduction_fn))]
    body = json.dumps([settings, [list(m) for m, _ in merges], [w for w, _ in vocab], CACHE_VERSION])
    return hashlib.sha256(body.encode()).hexdigest()


def _save_atomically(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _excluded(text: str, words: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", text, flags=re.IGNORECASE) for w in words)


def select(
    clip: ClipModel,
    attribute: str,
    values: list[str] | None = None,
    k: int = 20,
    exclude_words: list[str] | None = None,
    progress=None,
) -> tuple[str, list[RelatedText]]:
    """The query ``W_SA`` and its top-``k`` WordNet related texts with cosine scores."""
    query = attribute_query(attribute, values)
    k = validation.require_positive_int("num_related_texts", k, minimum=2)
    texts, synsets = wordnet_candidates()
    emb = gloss_embeddings(clip, progress=progress)
    q = clip.encode_text([query]).numpy()[0]
    scores = np.asarray(emb, dtype=np.float32) @ q.astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    words = [w.strip() for w in (exclude_words or []) if w and w.strip()]
    chosen: list[RelatedText] = []
    for i in order:
        if words and _excluded(texts[i], words):
            continue
        chosen.append(RelatedText(texts[i], float(scores[i]), synsets[i]))
        if len(chosen) == k:
            break
    if len(chosen) < k:
        raise validation.FairBalanceError(f"Only {len(chosen)} related texts remain after exclusions; lower k")
    return query, chosen
