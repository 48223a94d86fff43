"""Offline text resources: WordNet 3.0 noun glosses.

NLTK's own ``wordnet`` corpus is used when it is installed (``nltk.download``).
Otherwise the WordNet 3.0 database files of Debian's ``wordnet-base`` package
(``/usr/share/wordnet``) are adapted for NLTK's reader: they lack the
``lexnames`` file, which is the fixed list of 45 lexicographer files from the
WordNet 3.0 documentation: the files are copied once into fairbalance's own
NLTK data folder (in :func:`fairbalance.core.config.cache_dir`) together with a
generated ``lexnames``. Nothing is downloaded at run time.

CLI: ``python -m fairbalance check-wordnet``.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from dataclasses import dataclass

from fairbalance.core import config

#: WordNet 3.0 lexicographer files (lexnames(5WN)): number, name, syntactic category.
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_LEX_CATEGORY = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
_WORDNET_DB_FILES = (
    [f"{kind}.{pos}" for kind in ("data", "index") for pos in ("noun", "verb", "adj", "adv")]
    + [f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")]
)
DEBIAN_WORDNET_DIR = "/usr/share/wordnet"


class ResourceNotFoundError(RuntimeError):
    """An offline resource (WordNet) is not installed."""


@dataclass(frozen=True)
class NounGloss:
    """One WordNet noun synset: its id, first lemma (spaces, not underscores) and gloss."""

    synset: str
    lemma: str
    gloss: str


def _nltk_data_dir() -> str:
    """fairbalance's own NLTK data folder, added to ``nltk.data.path``."""
    import nltk

    path = os.path.join(config.cache_dir(), "nltk_data")
    if path not in nltk.data.path:
        nltk.data.path.append(path)
    return path


def _nltk_wordnet_available() -> bool:
    import nltk

    _nltk_data_dir()
    try:
        nltk.data.find("corpora/wordnet")
        return True
    except LookupError:
        return False


def _wordnet_db_dir() -> str | None:
    candidates = [os.environ.get("FAIRBALANCE_WORDNET_DIR"), os.environ.get("WNSEARCHDIR"), DEBIAN_WORDNET_DIR]
    for d in candidates:
        if d and all(os.path.isfile(os.path.join(d, f)) for f in _WORDNET_DB_FILES):
            return d
    return None


def _install_wordnet_from(db_dir: str) -> None:
    """Copy a WordNet 3.0 database folder into NLTK's layout and add ``lexnames``."""
    import shutil
    import tempfile

    corpora = os.path.join(_nltk_data_dir(), "corpora")
    os.makedirs(corpora, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".wordnet-", dir=corpora)
    for name in os.listdir(db_dir):
        src = os.path.join(db_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(tmp, name))
    with open(os.path.join(tmp, "lexnames"), "w") as f:
        for i, name in enumerate(WORDNET_LEXNAMES):
            f.write(f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n")
    target = os.path.join(corpora, "wordnet")
    try:
        os.rename(tmp, target)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=1)
def wordnet_root():
    """The offline WordNet's folder as an NLTK path pointer, without building the reader (which takes seconds).

    NLTK's own ``wordnet`` corpus when installed, else fairbalance's adapted copy (made on first use).
    """
    import nltk

    if _nltk_wordnet_available() and _is_complete_nltk_wordnet():
        return nltk.data.find("corpora/wordnet")
    root = os.path.join(_nltk_data_dir(), "corpora", "wordnet")
    if not os.path.isfile(os.path.join(root, "lexnames")):
        db_dir = _wordnet_db_dir()
        if db_dir is None:
            raise ResourceNotFoundError(
                "WordNet 3.0 is not installed. Install Debian's 'wordnet-base' package "
                "(apt-get install wordnet-base), point FAIRBALANCE_WORDNET_DIR at a WordNet 3.0 "
                "dict/ folder, or run 'python -m nltk.downloader wordnet' where a network exists."
            )
        _install_wordnet_from(db_dir)
    return nltk.data.FileSystemPathPointer(root)


@functools.lru_cache(maxsize=1)
def load_wordnet():
    """NLTK's WordNet reader over whichever offline copy is installed."""
    root = wordnet_root()
    if _is_complete_nltk_wordnet():
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions")
        return _reader_class()(root.path, None)


def _is_complete_nltk_wordnet() -> bool:
    """NLTK's own download (with ``index.sense``), not our adapted copy."""
    import nltk

    try:
        nltk.data.find("corpora/wordnet/index.sense")
        return True
    except LookupError:
        return False


def _reader_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class WordNet30Reader(WordNetCorpusReader):
        """NLTK's reader for a plain WordNet 3.0 database (no ``index.sense``).

        NLTK maps the loaded WordNet onto 3.0 sense keys for its Open
        Multilingual WordNet support; this database *is* 3.0, so the map is
        the identity and sense-key lookups (``lemma_from_key``) are
        unavailable.
        """

        def map_wn(self, version="wordnet"):
            return None

    return WordNet30Reader


#: Bump when :func:`noun_glosses` reads WordNet differently: cached glosses of older versions are not read.
GLOSSES_CACHE_VERSION = 1


@functools.lru_cache(maxsize=1)
def noun_glosses() -> tuple[NounGloss, ...]:
    """Every WordNet noun synset with its first lemma and gloss, in database order.

    NLTK's reader takes ~20 s of CPU for the 82k synsets, so the result is
    cached on disk (``<cache_dir>/wordnet_glosses``), keyed by the content of
    the database's noun files: a new process reads it in a fraction of a second.
    """
    path = glosses_cache_path(wordnet_root())
    cached = read_glosses(path)
    if cached is not None:
        return cached
    wn = load_wordnet()
    glosses = tuple(
        NounGloss(s.name(), s.lemmas()[0].name().replace("_", " "), s.definition())
        for s in wn.all_synsets("n")
    )
    write_glosses(path, glosses)
    return glosses


def glosses_cache_path(wordnet_root) -> str:
    """The cache file of the noun glosses of a WordNet database (keyed by its noun files' content).

    ``wordnet_root``: the reader's ``root``, an NLTK path pointer (a folder or a zip file).
    """
    import hashlib

    digest = hashlib.sha256(f"v{GLOSSES_CACHE_VERSION}".encode())
    for name in ("index.noun", "data.noun"):
        with wordnet_root.join(name).open() as f:
            digest.update(f.read())
    return os.path.join(config.cache_dir(), "wordnet_glosses", f"{digest.hexdigest()[:16]}.json")


def read_glosses(path: str) -> tuple[NounGloss, ...] | None:
    """Glosses written by :func:`write_glosses`; None when the file is missing or unreadable."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return tuple(NounGloss(*row) for row in json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def write_glosses(path: str, glosses) -> None:
    """Write glosses atomically (a concurrent reader sees the old file or the whole new one)."""
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([[g.synset, g.lemma, g.gloss] for g in glosses], f, ensure_ascii=False)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=1)
def wordnet_version() -> str:
    """The version in the header of ``data.adj``, read as NLTK's ``get_version`` reads it (no reader built)."""
    import re

    with wordnet_root().join("data.adj").open() as f:
        for line in f:
            match = re.search(rb"Word[nN]et (\d+|\d+\.\d+) Copyright", line)
            if match is not None:
                return match.group(1).decode()
    return str(load_wordnet().get_version())


def main(argv: list[str]) -> int:
    if argv[:1] != ["check-wordnet"]:
        print("usage: python -m fairbalance check-wordnet", file=sys.stderr)
        return 2
    try:
        wn = load_wordnet()
        synset = wn.synset("yellow_race.n.01")
    except (ResourceNotFoundError, LookupError, OSError) as e:
        print(f"WordNet: unavailable ({e})", file=sys.stderr)
        return 1
    print(f"WordNet {wn.get_version()} at {wn.root}: '{synset.lemmas()[0].name()}' means '{synset.definition()}'")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
