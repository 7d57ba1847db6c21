"""COCO instances files read for :func:`~mmneurons_utils.data.datasets.load_images`: every
field checked, errors naming the entry (``images[3]``, ``annotations[12]``) where the data cannot
be right, one-line notes where it can still be used, and boxes scaled to an image's own pixels."""

from __future__ import annotations

import json
import math
from pathlib import Path


class DatasetError(ValueError):
    """An image folder or annotation file cannot be used (the message says what is accepted)."""


def read_coco(path: str | Path, notes: list[str] | None = None) -> tuple[dict, list[str]]:
    """``({file_name: ((width, height) or None, [(category, [x, y, w, h]), …])}, category
    names)`` from a COCO instances file; :class:`DatasetError` naming what is wrong.

    An image entry's ``width`` / ``height`` may be left out (``None``: its boxes are in the
    image file's own pixels); every other field named in the module docstring is required.
    Errors, naming the entry: a field missing or of the wrong type (an id must be a number or
    a string, not a list), two entries with the same id, a bbox that is not four finite
    numbers with width, height ≥ 0. Notes (one line each, appended to ``notes``), where the
    file can still be used: zero-size boxes (dropped), two entries with one ``file_name``.
    """
    labels, categories, found = read_coco_entries(Path(path).expanduser())
    if notes is not None:
        notes.extend(found)
    return ({name: (size, [(c, box) for c, box, _ in objects]) for name, (size, objects) in labels.items()},
            categories)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))   # a UTF-8 BOM is fine
    except FileNotFoundError as exc:
        raise DatasetError(f"annotation file {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not JSON ({exc}); expected a COCO instances file") from exc
    except RecursionError:
        raise DatasetError(f"{path} nests lists or objects too deeply to be read (deeper than "
                           "Python's recursion limit); expected a COCO instances file") from None
    except OSError as exc:
        raise DatasetError(f"annotation file {path} cannot be read ({exc})") from exc


_FIELDS = ("images: id, file_name, width, height; annotations: image_id, category_id, bbox "
           "[x, y, w, h]; categories: id, name")


def _get(path: Path, entry, key: str, where: str):
    if not isinstance(entry, dict) or key not in entry:
        raise DatasetError(f"{path}: {where} has no '{key}' field ({_FIELDS})")
    return entry[key]


def _get_id(path: Path, entry, key: str, where: str):
    value = _get(path, entry, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, str)) and not (
            isinstance(value, float) and value.is_integer()):
        raise DatasetError(f"{path}: {key} of {where} is {str(value)[:40]!r}, expected a number "
                           "or a string")
    return value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_coco_entries(path: Path) -> tuple[dict, list[str], list[str]]:
    """:func:`read_coco` with each box's entry (``annotations[i]``) kept, and its notes."""
    data = _load_json(path)
    expected = "a COCO instances file with 'images', 'annotations' and 'categories' lists"
    keys = ("images", "annotations", "categories")
    missing = [k for k in keys if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{path} is not {expected} (missing or not a list: {', '.join(missing)})")
    notes: list[str] = []
    categories = _categories(path, data["categories"])
    files, labels = _image_entries(path, data["images"], notes)
    _add_boxes(path, data["annotations"], files, categories, labels, notes)
    return labels, sorted(set(categories.values())), notes


def _categories(path: Path, entries: list) -> dict:
    """``{category id: name}``; two entries with one id are an error naming both."""
    categories, first_of = {}, {}
    for i, c in enumerate(entries):
        where, cid = f"categories[{i}]", _get_id(path, c, "id", f"categories[{i}]")
        name = _get(path, c, "name", where)
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{path}: name of {where} is {str(name)[:40]!r}, expected a word")
        if cid in categories:
            raise DatasetError(f"{path}: {where} and {first_of[cid]} have the same id {cid!r}; "
                               "category ids must be unique")
        categories[cid], first_of[cid] = name, where
    return categories


def _image_entries(path: Path, entries: list, notes: list) -> tuple[dict, dict]:
    """``({image id: file_name}, {file_name: (size or None, [])})``; a repeated id is an error,
    a repeated file_name a note (its boxes are pooled)."""
    files, labels, entry_of, shared = {}, {}, {}, []
    for i, im in enumerate(entries):
        where = f"images[{i}]"
        image_id = _get_id(path, im, "id", where)
        name = _get(path, im, "file_name", where)
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{path}: file_name of {where} is {str(name)[:40]!r}, expected a file name")
        if image_id in files:
            raise DatasetError(f"{path}: {where} ({name}) and {entry_of[image_id]} ({files[image_id]}) "
                               f"have the same id {image_id!r}; image ids must be unique, else boxes "
                               "cannot be told apart")
        size = None
        if "width" in im or "height" in im:
            size = (_get(path, im, "width", where), _get(path, im, "height", where))
            if not all(_is_number(v) and v > 0 for v in size):
                raise DatasetError(f"{path}: width/height of {where} ({name}) are {list(size)}, "
                                   "expected positive numbers")
        if name in labels:
            shared.append(f"{where} ({name})")
        files[image_id], entry_of[image_id] = name, where
        labels.setdefault(name, (size, []))
    if shared:
        notes.append(f"{path.name}: {len(shared)} image entries repeat a file_name ({shared[0]}"
                     f"{', …' if len(shared) > 1 else ''}); their boxes are pooled")
    return files, labels


def _add_boxes(path: Path, entries: list, files: dict, categories: dict, labels: dict, notes: list) -> None:
    """Each annotation's ``(category, [x, y, w, h], entry)`` added to its image's labels; a
    non-finite or negative bbox is an error, a zero-size one a note (dropped)."""
    degenerate = []
    for i, a in enumerate(entries):
        where = f"annotations[{i}]"
        image_id, category_id = _get_id(path, a, "image_id", where), _get_id(path, a, "category_id", where)
        bbox = _get(path, a, "bbox", where)
        if image_id not in files:
            raise DatasetError(f"{path}: image_id {image_id!r} of {where} is not the id of an entry "
                               "of 'images'")
        if category_id not in categories:
            raise DatasetError(f"{path}: category_id {category_id!r} of {where} is not the id of an "
                               "entry of 'categories'")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
                and bbox[2] >= 0 and bbox[3] >= 0 and math.isfinite(bbox[0] + bbox[2])
                and math.isfinite(bbox[1] + bbox[3])):
            raise DatasetError(f"{path}: bbox of {where} is {str(bbox)[:60]}, expected [x, y, width, "
                               "height] (four finite numbers, width and height ≥ 0)")
        if bbox[2] == 0 or bbox[3] == 0:
            degenerate.append(f"{where} of {files[image_id]}")
            continue
        labels[files[image_id]][1].append((categories[category_id], [float(v) for v in bbox], where))
    if degenerate:
        notes.append(f"{path.name}: {len(degenerate)} zero-size box(es) dropped ({degenerate[0]}"
                     f"{', …' if len(degenerate) > 1 else ''})")


def image_boxes(objects, size, image, outside: list, clipped: list):
    """``[(category, (x0, y0, x1, y1))]`` of one image's objects in its file's pixels: a box
    outside the annotated image is dropped (its entry added to ``outside``), one reaching
    past its edge is clipped (added to ``clipped``)."""
    width, height = size or image.size
    sx, sy = image.width / width, image.height / height
    boxes = []
    for category, (x, y, w, h), where in objects:
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            outside.append(where)
            continue
        if x < 0 or y < 0 or x + w > width or y + h > height:
            clipped.append(where)
        x0, y0 = max(0.0, x), max(0.0, y)
        box = [x0, y0, min(width, x + w) - x0, min(height, y + h) - y0]
        boxes.append((category, _pixel_box(box, sx, sy, image.size)))
    return boxes


def _pixel_box(box, sx: float, sy: float, size) -> tuple[int, int, int, int]:
    """COCO ``[x, y, w, h]`` (annotated size) → ``(x0, y0, x1, y1)`` pixels of the image, x1/y1
    exclusive, clipped to it and at least one pixel wide and high."""
    x, y, w, h = box
    width, height = size
    x0 = min(width - 1, max(0, math.floor(x * sx)))
    y0 = min(height - 1, max(0, math.floor(y * sy)))
    x1, y1 = min(width, math.ceil((x + w) * sx)), min(height, math.ceil((y + h) * sy))
    return (x0, y0, max(x0 + 1, x1), max(y0 + 1, y1))
