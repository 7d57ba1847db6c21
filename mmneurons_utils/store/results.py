"""Resumable, atomic result files for batch runs (parquet).

The table is rewritten whole after each batch of images, to a temporary file that
then replaces the old one, so a killed run leaves the last complete file. The ids
of finished images (also those that produced no rows) live in the parquet schema
metadata, so a re-run skips them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

_DONE_KEY = b"mmneurons_done_images"


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``
    (same folder, so the rename is atomic): a killed run leaves the old file or the new one,
    never half of one, and no temporary file is left behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_parquet(table: pd.DataFrame, path: str | Path, metadata: dict[bytes, bytes]) -> Path:
    """``table`` as parquet at ``path``, atomically, with ``metadata`` added to its schema's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **metadata})
    return atomic_write(path, lambda tmp: pq.write_table(arrow, tmp))


def done_images(path: str | Path) -> list[str]:
    """The ids of the finished images that the result file at ``path`` records (its schema
    metadata only; the rows are not read)."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable parquet file ({exc}); remove it") from exc
    return json.loads(metadata.get(_DONE_KEY, b"[]"))


class ResultFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.suffix != ".parquet":
            raise ValueError(f"--out must end in .parquet, got {self.path}")
        if not self.path.parent.is_dir():
            raise ValueError(f"folder {self.path.parent} of --out does not exist")
        self.table = pd.DataFrame()
        self.done: list[str] = []
        if self.path.exists():
            import pyarrow.parquet as pq

            try:
                arrow = pq.read_table(self.path)
            except Exception as exc:  # not ours, or not parquet: never overwrite it silently
                raise ValueError(f"{self.path} exists and is not a readable parquet file ({exc}); "
                                 "remove it or choose another --out") from exc
            self.table = arrow.to_pandas()
            self.done = json.loads((arrow.schema.metadata or {}).get(_DONE_KEY, b"[]"))

    def append(self, rows: pd.DataFrame, image_ids: list[str]) -> None:
        self.table = pd.concat([self.table, rows], ignore_index=True) if len(self.table) else rows
        self.done = self.done + list(image_ids)
        write_parquet(self.table, self.path, {_DONE_KEY: json.dumps(self.done).encode()})
