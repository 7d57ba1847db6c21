"""Resumable, atomic result files for batch runs (parquet) that know what they hold.

The table is rewritten whole after each batch of images, to a temporary file that
then replaces the old one, so a killed run leaves the last complete file (and the next
write removes the temporary file it left). The schema metadata holds the ids of the
finished images (also those that produced no rows), so a re-run skips them, and the run's
settings and a content hash of each finished image (:mod:`~mmneurons_utils.provenance`),
so a re-run with other settings or changed images is refused instead of mixed in.

A file that this package did not write is never appended to or rewritten, and one output
has one writer at a time (:func:`exclusive`, a lock file beside it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from .files import (ResultFileError, atomic_write, check_writable_folder, exclusive,  # noqa: F401
                    output_path, remove_stale_temporaries)
from .provenance import changed_images, differences

_DONE_KEY = b"mmneurons_done_images"
_RUN_KEY = b"mmneurons_run"     # JSON: {"settings": {...}, "images": {image id: content hash}}


def check_output_file(path: str | Path, option: str = "--out", suffix: str | None = ".parquet") -> Path:
    """``path`` as an output file, checked before any work: the right suffix, not a folder,
    in an existing folder that this user can write (``ValueError`` naming it otherwise)."""
    given = Path(path).expanduser()
    path = output_path(given)     # a symbolic link: its target is checked (and written)
    if path.is_dir():
        raise ResultFileError(f"{option} {given} is a folder; give a file name ending in {suffix}")
    if suffix and given.suffix != suffix:
        raise ResultFileError(f"{option} must end in {suffix}, got {given}")
    check_writable_folder(path.parent, f"folder {path.parent} of {option}")
    if path.exists() and not path.is_file():
        raise ResultFileError(f"{option} {path} exists and is not a regular file")
    return path


def respect_umask(folder: str | Path) -> Path:
    """Give ``folder`` and everything in it the permissions a plain ``mkdir`` / ``open`` would
    (``0o777`` / ``0o666`` less the umask): a folder made by :func:`tempfile.mkdtemp` is
    ``0700``, readable by its owner only."""
    folder = Path(folder)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
    return folder


def write_parquet(table: pd.DataFrame, path: str | Path, metadata: dict[bytes, bytes]) -> Path:
    """``table`` as parquet at ``path``, atomically, with ``metadata`` added to its schema's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow = pa.Table.from_pandas(table, preserve_index=False)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **metadata})
    return atomic_write(path, lambda tmp: pq.write_table(arrow, tmp))


def _read_metadata(path: Path) -> dict:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise ResultFileError(f"{path} exists and is not a readable parquet file ({exc}); "
                              "remove it or choose another --out") from exc


def _check_ours(path: Path, metadata: dict) -> None:
    if _DONE_KEY not in metadata:
        what = "an atlas table" if b"mmneurons_atlas" in metadata else "a parquet file"
        raise ResultFileError(f"{path} is {what} that mmneurons find did not write; it is left "
                              "untouched: choose another --out")


def done_images(path: str | Path) -> list[str]:
    """The ids of the finished images that the result file at ``path`` records (its schema
    metadata only; the rows are not read)."""
    path = Path(path)
    metadata = _read_metadata(path)
    _check_ours(path, metadata)
    return json.loads(metadata.get(_DONE_KEY, b"[]"))


def read_run(path: str | Path) -> dict:
    """``{"settings": …, "images": {id: hash}}`` recorded in the result file at ``path``
    (empty for a file written before settings were recorded)."""
    return json.loads(_read_metadata(Path(path)).get(_RUN_KEY, b"{}"))


class ResultFile:
    """A result file of ``mmneurons find`` (or one of its part files): ``table``, ``done``
    (finished image ids), ``settings`` and ``images`` (id → content hash) as recorded.

    Opening a file this package did not write raises :class:`ResultFileError` (it is
    never rewritten). :meth:`expect` checks that the file holds this run's settings and
    images before any work; :meth:`append` adds a batch's rows atomically."""

    def __init__(self, path: str | Path):
        self.path = check_output_file(path)
        self.table = pd.DataFrame()
        self.done: list[str] = []
        self.settings: dict | None = None
        self.images: dict[str, str] = {}
        self.sources: list[str] = []
        self._wanted_images: dict[str, str] = {}
        if self.path.exists():
            import pyarrow.parquet as pq

            metadata = _read_metadata(self.path)
            _check_ours(self.path, metadata)
            arrow = pq.read_table(self.path)
            self.table = arrow.to_pandas()
            self.done = json.loads(metadata.get(_DONE_KEY, b"[]"))
            run = json.loads(metadata.get(_RUN_KEY, b"{}"))
            self.settings, self.images = run.get("settings"), dict(run.get("images", {}))
            self.sources = list(run.get("sources", []))

    def expect(self, settings: dict, images: dict[str, str], source: str | None = None) -> None:
        """Refuse (:class:`ResultFileError`, one line) unless the file holds results of the
        same ``settings`` (the keys given; call again with more once they are known) and its
        copy of every image of ``images`` (id → content hash) that it already holds is the
        same; a new or empty file takes them on. ``source``: where the images come from (in
        words; recorded, not compared: the content hashes are the images' identity)."""
        fresh = not self.done
        if not fresh and self.settings is None:
            raise ResultFileError(f"{self.path} was written by an older mmneurons find that did not "
                                  "record its settings, so it cannot be resumed safely; remove it or "
                                  "choose another --out")
        if not fresh:
            diff = differences(self.settings, settings)
            if diff:
                raise ResultFileError(f"{self.path} holds results of other settings ({'; '.join(diff)}); "
                                      "rerun with its settings to resume, or remove it / choose "
                                      "another --out to start fresh")
            changed = changed_images(self.images, images)
            if changed:
                raise ResultFileError(
                    f"{self.path} holds results of other contents for {len(changed)} image(s) of this "
                    f"run under the same names ({', '.join(changed[:3])}{'…' if len(changed) > 3 else ''}); "
                    "remove it or choose another --out to recompute")
        self.settings = {**(self.settings or {}), **settings}
        self._wanted_images.update(images)
        if source and source not in self.sources:
            self.sources.append(source)

    def append(self, rows: pd.DataFrame, image_ids: list[str]) -> None:
        self.table = pd.concat([self.table, rows], ignore_index=True) if len(self.table) else rows
        self.done = self.done + list(image_ids)
        for name in image_ids:
            if name in self._wanted_images:
                self.images[name] = self._wanted_images[name]
        metadata = {_DONE_KEY: json.dumps(self.done).encode()}
        if self.settings is not None:
            metadata[_RUN_KEY] = json.dumps(dict(settings=self.settings, sources=self.sources,
                                                 images=self.images)).encode()
        write_parquet(self.table, self.path, metadata)
