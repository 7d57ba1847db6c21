"""A local checkpoint folder checked before ``from_pretrained`` reads it, with one-line errors
that name the file: a ``config.json`` that is not JSON, no weights file, a truncated or
damaged safetensors file, no processor / tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from safetensors import safe_open

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


TRAINED_FILE = "trained.safetensors"   # smol-llava's trained parts: vision tower, projector, LoRA


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded (the message names the file)."""


def read_config(folder: str | Path) -> dict:
    """The folder's ``config.json`` as a dict; :class:`CheckpointError` naming it otherwise."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the checkpoint's config is "
                              "damaged: copy it again") from exc
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, expected an object "
                              "with model_type")
    return config


def check_checkpoint(folder: str | Path, weight_files: Sequence[str] | None = None) -> None:
    """Every file ``from_pretrained`` needs is there and whole (safetensors headers and sizes
    checked with the ``safetensors`` library; nothing is loaded). ``weight_files``: the names
    of which one must be there instead of :data:`WEIGHT_FILES` (and sharded ``model-*``)."""
    folder = Path(folder)
    expected = WEIGHT_FILES if weight_files is None else tuple(weight_files)
    weights = [folder / name for name in expected if (folder / name).is_file()]
    shards = sorted(folder.glob("model-*.safetensors")) if weight_files is None else []
    if not weights and not shards:
        raise CheckpointError(f"{folder} has no weights file (expected "
                              f"{'one of ' if len(expected) > 1 else ''}{', '.join(expected)}); "
                              "copy the whole checkpoint folder")
    for path in [p for p in weights if p.suffix == ".safetensors"] + shards:
        check_safetensors(path)
    if not any((folder / name).is_file() for name in PROCESSOR_FILES):
        raise CheckpointError(f"{folder} has no image processor file (expected "
                              f"{' or '.join(PROCESSOR_FILES)}); copy the whole checkpoint folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder} has no tokenizer file (expected one of "
                              f"{', '.join(TOKENIZER_FILES)}); copy the whole checkpoint folder")
    for name in JSON_FILES:
        if (folder / name).is_file():
            check_json(folder / name)


# the JSON files from_pretrained reads (each must be a JSON object)
JSON_FILES = ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json", "model.safetensors.index.json",
              "added_tokens.json", "vocab.json")


def check_json(path: Path) -> None:
    """``path`` holds one JSON object; :class:`CheckpointError` naming it otherwise."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as exc:   # not JSON / UTF-8, unreadable
        raise CheckpointError(f"{path} is not valid JSON ({' '.join(str(exc).split())[:120]}); it is "
                              "damaged: copy it again from the checkpoint") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a JSON {type(content).__name__}, expected an object; "
                              "copy it again from the checkpoint")


def check_safetensors(path: str | Path) -> None:
    """``path`` opens as a complete safetensors file (header and every tensor's bytes)."""
    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except Exception as exc:  # SafetensorError / OSError: say which file, in one line
        raise CheckpointError(f"{path} is not a complete safetensors file ({exc}); it is "
                              "truncated or damaged: copy it again") from exc
