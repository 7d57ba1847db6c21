"""Tables a notebook produces, saved as CSV beside its figures.

``save_table(df, output_dir, "01_layer_distribution")`` writes
``<output_dir>/tables/01_layer_distribution.csv``: the numbers behind a figure or a
printed table, for readers who want to re-plot or compare runs. List-valued cells
(``top_tokens``) are written space-separated so the CSV stays one row per record.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _flat(value):
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    if hasattr(value, "tolist") and not isinstance(value, str) and getattr(value, "ndim", 0):
        return " ".join(map(str, value.tolist()))
    return value


def save_table(df: pd.DataFrame | pd.Series, output_dir: str | Path, name: str,
               index: bool | None = None) -> Path:
    """Write ``df`` to ``<output_dir>/tables/<name>.csv`` (folder created) and return the path.

    ``index``: write the index too; by default only when it is not a plain ``RangeIndex``
    (a named or labelled index carries information, e.g. layers or model names).
    """
    if isinstance(df, pd.Series):
        df = df.to_frame()
    folder = Path(output_dir) / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    if index is None:
        index = not isinstance(df.index, pd.RangeIndex)
    flat = df.copy()
    for column in flat.columns[flat.dtypes == object]:
        flat[column] = flat[column].map(_flat)
    flat.to_csv(path, index=index)
    return path
