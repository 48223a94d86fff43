import subprocess
import sys

import pytest

from fairbalance.find import resources


def test_wordnet_noun_glosses_offline():
    glosses = resources.noun_glosses()
    assert len(glosses) == 82115  # WordNet 3.0 noun synsets
    by_synset = {g.synset: g for g in glosses}
    yellow = by_synset["yellow_race.n.01"]
    assert yellow.lemma == "Yellow race" and yellow.gloss == "an Asian race"
    assert "_" not in "".join(g.lemma for g in glosses[:1000])
    assert resources.wordnet_version() == "3.0"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_check_wordnet_cli():
    out = subprocess.run(
        [sys.executable, "-m", "fairbalance.find.resources", "check-wordnet"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "an Asian race" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fairbalance.find.resources", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_glosses_cache_is_keyed_by_the_noun_files_and_round_trips(tmp_path, monkeypatch):
    """The disk cache of the glosses: another database (other noun files) gets another file; what is read back
    is what was written; a damaged file reads as missing (parsed again), never as wrong glosses."""
    import nltk
    from nltk.data import FileSystemPathPointer

    monkeypatch.setattr(nltk.data, "path", [*nltk.data.path, str(tmp_path)])  # NLTK opens only its data folders

    def db(name, data):
        root = tmp_path / name
        root.mkdir()
        (root / "index.noun").write_text("dog n 1 0 1 0 02084071\n")
        (root / "data.noun").write_text(data)
        return FileSystemPathPointer(str(root))

    a, b = db("a", "02084071 05 n 01 dog 0 000 | a domestic animal\n"), db("b", "02084071 05 n 01 dog 0 000 | a pet\n")
    path_a, path_b = resources.glosses_cache_path(a), resources.glosses_cache_path(b)
    assert path_a != path_b and path_a == resources.glosses_cache_path(db("a2", (tmp_path / "a" / "data.noun").read_text()))
    glosses = (resources.NounGloss("dog.n.01", "dog", "a domestic animal"), resources.NounGloss("é.n.01", "é", "ü"))
    assert resources.read_glosses(path_a) is None
    resources.write_glosses(path_a, glosses)
    assert resources.read_glosses(path_a) == glosses
    with open(path_a, "w") as f:
        f.write('[["dog.n.01", "dog"')  # cut short
    assert resources.read_glosses(path_a) is None


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_glosses_parsed_from_wordnet_equal_the_cached_ones(tmp_path, monkeypatch):
    """The NLTK parse behind the cache (a fresh cache folder: parsed, written), and what a later process reads."""
    cached = resources.noun_glosses()
    monkeypatch.setenv("FAIRBALANCE_CACHE_DIR", str(tmp_path / "cache"))
    for fn in (resources.noun_glosses, resources.wordnet_root, resources.load_wordnet, resources.wordnet_version):
        fn.cache_clear()
    try:
        parsed = resources.noun_glosses()
        assert parsed == cached and len(parsed) == 82115
        assert resources.read_glosses(resources.glosses_cache_path(resources.wordnet_root())) == parsed
        assert resources.wordnet_version() == resources.load_wordnet().get_version() == "3.0"
    finally:
        for fn in (resources.noun_glosses, resources.wordnet_root, resources.load_wordnet, resources.wordnet_version):
            fn.cache_clear()
