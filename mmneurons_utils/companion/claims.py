"""An alias: the scorecard is :mod:`mmneurons_utils.scorecard` (its own layer). This module keeps
``from mmneurons_utils.companion.claims import …`` and ``python -m mmneurons_utils.companion.claims
OUTPUT_DIR`` working."""

import sys

from ..scorecard.claims import *  # noqa: F401,F403
from ..scorecard.claims import COLUMNS, NULLS, __all__, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
