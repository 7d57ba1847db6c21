"""What every command shares: the one error type for a bad command-line value, the images
and model that ``--scenes`` / ``--images`` / ``--model`` name, and JSON-safe numbers."""

from __future__ import annotations

import hashlib

from ..data.datasets import load_images, prepare_model
from ..model.vlm import load_vlm


class CliError(ValueError):
    """A bad command-line value."""


def data_of(args):
    """The :class:`~mmneurons_utils.data.datasets.ImageSet` of ``--scenes``/``--seed`` or
    ``--images`` (with ``--annotations``)."""
    if args.annotations and not args.images:
        raise CliError("--annotations needs --images DIR, the folder of the images it annotates")
    if args.images:
        return load_images(args.images, args.annotations)
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
    return vlm


def say_noun_source(args, vlm) -> None:
    """With ``--images`` and no ``--json``, one line naming where caption nouns come from."""
    if args.images and not args.json:
        print(f"caption nouns from {vlm.noun_source}")


def finite(value):
    """JSON-safe number: NaN → None."""
    return None if isinstance(value, float) and value != value else value


def names_hash(names) -> str:
    return hashlib.blake2b("\n".join(names).encode(), digest_size=6).hexdigest()
