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
def load_wordnet():
    """NLTK's WordNet reader over whichever offline copy is installed."""
    if _nltk_wordnet_available() and _is_complete_nltk_wordnet():
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
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
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The multilingual functions")
        return _reader_class()(root, None)


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


@functools.lru_cache(maxsize=1)
def noun_glosses() -> tuple[NounGloss, ...]:
    """Every WordNet noun synset with its first lemma and gloss, in database order."""
    wn = load_wordnet()
    return tuple(
        NounGloss(s.name(), s.lemmas()[0].name().replace("_", " "), s.definition())
        for s in wn.all_synsets("n")
    )


def wordnet_version() -> str:
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
