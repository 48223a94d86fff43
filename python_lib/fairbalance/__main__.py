"""``python -m fairbalance ...``: the same command line as ``fairbalance`` (see :mod:`fairbalance.cli`)."""

import sys

from fairbalance.cli import main

sys.exit(main())
