"""Command line: ``python -m fairbalance check-wordnet`` (checks the WordNet 3.0 files NLTK will read)."""

import sys

from fairbalance.resources import _main

sys.exit(_main(sys.argv[1:]))
