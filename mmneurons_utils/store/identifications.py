"""An identification on disk: a folder that one notebook writes and the next ones read.

    <folder>/table.parquet          the long-form table (the public ``find_neurons`` columns)
    <folder>/activations.safetensors  each caption's recorded activations (``steps.<i>``,
                                    ``image.<i>``), bit for bit
    <folder>/identification.json    the sidecar: captions (text, tokens, noun steps), image
                                    keys, settings, identity (weights hash, image hashes)

The sidecar is written last, each file atomically, so a folder without one (a killed run) is
not an identification and is computed again. Nothing here knows what a caption is;
:class:`~mmneurons_utils.method.identification.Identification` turns itself into these parts
and back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .files import ResultFileError, atomic_write, atomic_write_text, check_writable_folder

SIDECAR = "identification.json"
FORMAT = 1


def save_identification(folder: str | Path, table: pd.DataFrame, tensors: dict[str, torch.Tensor],
                        sidecar: dict) -> Path:
    """Write ``table``, ``tensors`` (name → tensor, bit for bit) and ``sidecar`` (JSON) to
    ``folder`` (made if missing), the sidecar last; returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    check_writable_folder(folder, "the identification's folder")
    (folder / SIDECAR).unlink(missing_ok=True)      # the folder is not one until it is complete
    atomic_write(folder / "table.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    atomic_write(folder / "activations.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(folder / SIDECAR, json.dumps(dict(sidecar, format=FORMAT), indent=1))
    return folder


def read_sidecar(folder: str | Path) -> dict | None:
    """The sidecar of the identification in ``folder``; ``None`` when there is none or it is
    not readable (a killed write, another program's file)."""
    try:
        sidecar = json.loads((Path(folder) / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return sidecar if isinstance(sidecar, dict) and sidecar.get("format") == FORMAT else None


def load_identification(folder: str | Path) -> tuple[pd.DataFrame, dict[str, torch.Tensor], dict]:
    """``(table, tensors, sidecar)`` of the identification in ``folder``;
    :class:`ResultFileError` naming the folder when it holds none or a damaged one."""
    from safetensors.torch import load_file

    folder = Path(folder)
    sidecar = read_sidecar(folder)
    if sidecar is None:
        raise ResultFileError(f"{folder} holds no saved identification ({SIDECAR} missing or unreadable)")
    try:
        table = pd.read_parquet(folder / "table.parquet")
        tensors = load_file(str(folder / "activations.safetensors"))
    except Exception as exc:          # a damaged file: say which folder, not pyarrow's internals
        raise ResultFileError(f"{folder}: the saved identification is damaged ({exc})") from exc
    for column in table.columns:      # parquet gives list cells back as arrays; the table holds lists
        if table[column].dtype == object and len(table) and isinstance(table[column].iloc[0], np.ndarray):
            table[column] = [list(cell) for cell in table[column]]
    return table, tensors, sidecar


__all__ = ["save_identification", "load_identification", "read_sidecar", "ResultFileError"]
