"""What every command shares: the one error type for a bad command-line value, the checks
made before any work (``--method``, a folder to be made), the images and model that
``--scenes`` / ``--images`` / ``--model`` name (with the annotations' notes), and JSON-safe
numbers."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from ..data.datasets import load_images, match_category, prepare_model
from ..method.identify import ALL_METHODS
from ..model.vlm import load_vlm
from ..store.files import check_writable_folder, output_path


class CliError(ValueError):
    """A bad command-line value."""


def check_method(method: str) -> str:
    """``--method`` is one of :data:`~mmneurons_utils.method.identify.ALL_METHODS` (before any work)."""
    if method not in ALL_METHODS:
        raise CliError(f"--method must be one of {', '.join(ALL_METHODS)}, got {method!r}")
    return method


def check_new_folder(folder, option: str, parents: bool = True) -> Path:
    """``folder`` (to be created, or empty) can be made here: its nearest existing ancestor
    (``parents=False``: its parent) is a writable folder."""
    folder = output_path(folder)      # a symbolic link: its target
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{option} {folder} exists and is not a folder; choose a folder")
    if not parents and not folder.parent.is_dir():
        raise CliError(f"folder {folder.parent} of {option} does not exist")
    existing = nearest_existing(folder)
    check_writable_folder(existing, f"{option} {folder}" if existing == folder else
                          f"folder {existing} (where {option} {folder} would be made)")
    return folder


def nearest_existing(folder: Path) -> Path:
    """``folder`` when it exists, else its nearest existing ancestor."""
    existing = folder if folder.exists() else folder.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def model_bytes(vlm) -> int:
    """The bytes of the model's parameters (what saving it writes, about)."""
    return sum(p.numel() * p.element_size() for p in vlm.model.parameters())


def data_of(args):
    """The :class:`~mmneurons_utils.data.datasets.ImageSet` of ``--scenes``/``--seed`` or
    ``--images`` (with ``--annotations``)."""
    if args.annotations and not args.images:
        raise CliError("--annotations needs --images DIR, the folder of the images it annotates")
    if args.images:
        data = load_images(args.images, args.annotations)
        for note in data.notes:          # what the annotations lack, one line each
            print(f"mmneurons {args.command}: note: {note}", file=sys.stderr)
        return data
    return load_images(n=args.scenes, seed=args.seed)


def images_of(args, data=None):
    """``(names, images, scenes or None)`` from ``--scenes``/``--seed`` or ``--images``."""
    data = data_of(args) if data is None else data
    return data.names, data.images, (data if data.kind == "scenes" else None)


def load_model(args, data):
    """The model of ``--model``; with ``--annotations`` its candidate nouns are the
    annotation's categories (used only by a real model when no tagger is installed)."""
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    if args.annotations:
        prepare_model(vlm, data)
        _note_unmatched_categories(args, vlm, data)
    return vlm


def _note_unmatched_categories(args, vlm, data) -> None:
    """One line naming the annotation categories that no word of the model's noun vocabulary
    names (their boxes can never be matched to a caption noun)."""
    if vlm.noun_vocabulary is None:
        return
    named = {match_category(word, data.categories) for word in vlm.noun_vocabulary}
    unmatched = [c for c in data.categories if c not in named]
    if unmatched:
        print(f"mmneurons {args.command}: note: {len(unmatched)} categories of {args.annotations} "
              f"name no noun the model says ({', '.join(unmatched[:5])}{', …' if len(unmatched) > 5 else ''});"
              " their boxes are never used", file=sys.stderr)


def say_noun_source(args, vlm) -> None:
    """With ``--images`` and no ``--json``, one line naming where caption nouns come from."""
    if args.images and not args.json:
        print(f"caption nouns from {vlm.noun_source}")


def finite(value):
    """JSON-safe number: NaN → None."""
    return None if isinstance(value, float) and value != value else value


def names_hash(names) -> str:
    return hashlib.blake2b("\n".join(names).encode(), digest_size=6).hexdigest()
