"""The paper-claims scorecard (a layer of its own, below the batch tools): each claim of
Pan et al. (2024) judged on the tables a notebook run wrote.

* :mod:`.schema`: the tables it reads, declared once (file, notebook, layout, columns, models);
* :mod:`.evidence` and :mod:`.editors`: what each table says about each model;
* :mod:`.claims`: the claims, their rules as data, the card and its files.

``python -m mmneurons_utils.scorecard OUTPUT_DIR`` writes ``OUTPUT_DIR/claims.csv`` and
``claims.md``.
"""

from .claims import (CLAIMS, FAILS, HOLDS, NOT_MEASURED, PARTLY, Claim, scorecard, to_markdown,
                     write_scorecard)
from .evidence import Evidence, wilson_interval
from .schema import TABLES, Table, read_tables, schema_markdown

__all__ = ["CLAIMS", "Claim", "Evidence", "FAILS", "HOLDS", "NOT_MEASURED", "PARTLY", "TABLES", "Table",
           "read_tables", "schema_markdown", "scorecard", "to_markdown", "wilson_interval", "write_scorecard"]
