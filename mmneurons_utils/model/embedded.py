"""The registry of embedded models: name → checkpoint folder.

The model layer only reads it (:func:`~mmneurons_utils.model.vlm.load_vlm` looks a name up here
before it treats the name as a folder or a hub id); the layer that ships weights fills it:
:mod:`mmneurons_utils.tiny.registry` registers ``tiny-llava``, ``tiny-instructblip`` and
``smol-llava`` when the package is imported. A project of one's own may register more::

    from mmneurons_utils.model.embedded import register_embedded
    register_embedded("my-llava", "/models/my-llava")     # then load_vlm("my-llava")
"""

from __future__ import annotations

from pathlib import Path

# name → folder, in registration order (``name in EMBEDDED``, ``", ".join(EMBEDDED)`` work on it)
EMBEDDED: dict[str, Path] = {}


def register_embedded(name: str, folder: str | Path) -> None:
    """Make ``name`` an embedded model whose checkpoint is ``folder`` (it need not exist yet:
    :func:`~mmneurons_utils.model.vlm.load_vlm` then says how to train it)."""
    EMBEDDED[str(name)] = Path(folder)


def embedded_folder(name: str | Path) -> Path | None:
    """The folder of the embedded model ``name``; ``None`` when no such model is registered."""
    return EMBEDDED.get(str(name))


def model_folder(name_or_path: str | Path) -> Path:
    """Where a model named as :func:`~mmneurons_utils.model.vlm.load_vlm` takes it would be on
    disk: an embedded model's folder, else the path itself (``~`` expanded; it may not exist,
    e.g. for a hub id)."""
    return embedded_folder(name_or_path) or Path(str(name_or_path)).expanduser()
