"""``python -m fairbalance ...``: the same command line as ``fairbalance`` (see :mod:`fairbalance.ops.cli`)."""

import sys

from fairbalance.ops.cli import main

sys.exit(main())
