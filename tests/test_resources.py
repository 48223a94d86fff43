import subprocess
import sys

from fairbalance.find import resources


def test_wordnet_noun_glosses_offline():
    glosses = resources.noun_glosses()
    assert len(glosses) == 82115  # WordNet 3.0 noun synsets
    by_synset = {g.synset: g for g in glosses}
    yellow = by_synset["yellow_race.n.01"]
    assert yellow.lemma == "Yellow race" and yellow.gloss == "an Asian race"
    assert "_" not in "".join(g.lemma for g in glosses[:1000])
    assert resources.wordnet_version() == "3.0"


def test_check_wordnet_cli():
    out = subprocess.run(
        [sys.executable, "-m", "fairbalance.find.resources", "check-wordnet"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "an Asian race" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fairbalance.find.resources", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2
