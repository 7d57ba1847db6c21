"""The embedded models' weights, registered with the model layer's registry
(:mod:`mmneurons_utils.model.embedded`) when the package is imported: ``load_vlm("tiny-llava")``
finds them by name, and nothing below this layer knows where they lie."""

from __future__ import annotations

from pathlib import Path

from ..model.embedded import register_embedded

WEIGHTS_DIR = Path(__file__).parent / "weights"   # one folder per model (what tiny.train writes)
NAMES = ("tiny-llava", "tiny-instructblip", "smol-llava")

for _name in NAMES:
    register_embedded(_name, WEIGHTS_DIR / _name)
