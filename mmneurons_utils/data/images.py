"""Reading user images from a folder, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file or folder cannot be used."""


def read_image(path: str | Path) -> Image.Image:
    """An RGB image, fully decoded now (so a truncated file fails here, not later)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise ImageReadError(f"image {path} does not exist") from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"image {path} is not a readable image "
                             f"(accepted: {', '.join(IMAGE_SUFFIXES)})") from exc
    except OSError as exc:
        raise ImageReadError(f"image {path} cannot be read: {exc}") from exc


def read_image_folder(folder: str | Path) -> list[tuple[str, Image.Image]]:
    """``(file name, image)`` for every image file directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageReadError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageReadError(f"{folder} holds no images (accepted: {', '.join(IMAGE_SUFFIXES)})")
    return [(p.name, read_image(p)) for p in files]
