"""Pixels as a viewer shows them: the EXIF orientation applied, high bit depths scaled to 8 bits
(``I;16``: 0 … 65535 → 0 … 255) rather than clipped at 255 as ``convert("RGB")`` does, and
transparent pixels (an alpha band, or a palette's transparent colour) composited on white. Used by
the image reader (:mod:`mmneurons_utils.data.images`) and by ``VLM.describe`` for PIL images."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# the full range of each high-bit-depth mode (float images are taken as 0 … 1)
_FULL_RANGE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
               "I": 65535.0, "F": 1.0}


def as_viewed(image: Image.Image) -> Image.Image:
    """``image`` as RGB the way an image viewer shows it: EXIF orientation applied, high
    bit depths scaled to 8 bits (see the module doc)."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in _FULL_RANGE:
        image = _to_8_bit(image)
    if _has_alpha(image):   # transparent pixels as a viewer shows them: on white, not their hidden RGB
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` has transparency: an alpha band, or a palette / grey / RGB image with a
    transparent colour (PNG ``tRNS``)."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16/32-bit grayscale image as 8-bit ``L``, scaled from its mode's full range (a
    32-bit integer image whose values exceed 16 bits: from its own maximum)."""
    values = np.asarray(image, dtype=np.float64)
    top = _FULL_RANGE[image.mode]
    if image.mode == "I" and values.max(initial=0) > 65535:
        top = float(values.max())
    scaled = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")
