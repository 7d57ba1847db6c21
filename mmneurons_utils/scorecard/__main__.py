"""``python -m mmneurons_utils.scorecard [OUTPUT_DIR] [--model M]``: the scorecard's files."""

import sys

from .claims import main

sys.exit(main())
