"""Reading user images as a viewer shows them, with errors that name the file.

* the EXIF orientation is applied (a phone photo stored sideways with an orientation tag is
  read upright, :func:`PIL.ImageOps.exif_transpose`);
* 16-bit and 32-bit images (``I;16``, ``I``, ``F``) are scaled to 8 bits from their type's
  full range (``I;16``: 0 … 65535 → 0 … 255), not clipped at 255 as ``convert("RGB")`` does;
* a file whose header claims more pixels than Pillow's limit
  (:data:`PIL.Image.MAX_IMAGE_PIXELS`, about 89 million; raise it there to read larger ones)
  is refused before it is decoded (a decompression bomb).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..model.pixels import as_viewed

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file or folder cannot be used."""


def read_image(path: str | Path) -> Image.Image:
    """An RGB image as a viewer shows it, fully decoded now (so a truncated file fails here,
    not later)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return as_viewed(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageReadError(f"image {path} is too large to read safely ({_pixels(exc)}; the "
                             f"limit is {Image.MAX_IMAGE_PIXELS:,} pixels, "
                             "PIL.Image.MAX_IMAGE_PIXELS): possibly a decompression bomb") from exc
    except FileNotFoundError as exc:
        raise ImageReadError(f"image {path} does not exist") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"image {path} is not a readable image "
                             f"(accepted: {', '.join(IMAGE_SUFFIXES)})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(f"image {path} cannot be read: {exc}") from exc


def _pixels(exc: Exception) -> str:
    """``"900,000,000 pixels"`` from Pillow's message, else its message."""
    import re

    match = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(match[1]):,} pixels" if match else str(exc)


def read_image_folder(folder: str | Path) -> list[tuple[str, Image.Image]]:
    """``(file name, image)`` for every image file directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageReadError(f"{folder} holds no images (accepted: {', '.join(IMAGE_SUFFIXES)})")
    return [(p.name, read_image(p)) for p in files]
