"""Images to study: the embedded scenes, or a folder of your own, optionally with COCO boxes.

One abstraction for the notebooks, the widgets and the CLI. :func:`load_images` returns an
:class:`ImageSet` — a list of samples that each carry ``image``, ``name``, ``nouns`` (the
objects known to be in it), ``boxes`` (``(name, (x0, y0, x1, y1))`` in pixels, x1/y1
exclusive) and ``caption`` (a reference caption, or ``None``):

* ``images=None`` (or ``""``): ``n`` generated scenes of ``seed`` from the registered
  :class:`SceneSource` (the embedded scenes, :class:`~mmneurons_utils.tiny.scenes.Scene`
  objects, which :mod:`mmneurons_utils.tiny.registry` registers), with their true captions,
  nouns and boxes;
* ``images="photos/"``: every image directly in the folder (sorted by file name; the first
  ``n`` when ``n`` is given), with no nouns, boxes or captions;
* plus ``annotations="photos/annotations.json"``: a COCO instances file (``images`` with
  ``id`` and ``file_name``; ``annotations`` with ``image_id``, ``category_id`` and ``bbox`` =
  ``[x, y, width, height]``; ``categories`` with ``id`` and ``name``) supplies each image's
  object names and boxes (scaled when the file's size differs from the annotated one).

A caption's noun is matched to an annotation's category by
:func:`~mmneurons_utils.data.objects.match_category`, in
this order: the same word; the same singular (``dogs`` → ``dog``, ``buses`` → ``bus``,
``ponies`` → ``pony``, ``men`` → ``man``); a synonym of :data:`~mmneurons_utils.data.objects.SYNONYMS` (``man`` /
``woman`` / ``people`` → ``person``, ``television`` → ``tv``, ``phone`` → ``cell phone``, …);
the last word of a multi-word category (``glass`` → ``wine glass``, ``hydrant`` →
``fire hydrant``). :func:`unmatched_nouns` reports the nouns that matched nothing.
The annotation file is read and checked by :mod:`~mmneurons_utils.data.coco`.

The data layer sits below the science layers: it imports only the model layer's pixel reading
and the store; the scenes come in through :func:`register_scene_source`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from PIL import Image

from ..store.files import atomic_write, atomic_write_text, check_free_space, check_writable_folder, output_path
from .coco import DatasetError, image_boxes, read_coco, read_coco_entries  # noqa: F401  (read_coco: here too)
from .images import IMAGE_SUFFIXES, ImageReadError, read_image
from .objects import candidate_words, match_category


@dataclass(frozen=True)
class SceneSource:
    """Generated scenes for ``load_images(images=None)``: ``make(n, seed=seed)`` gives ``n``
    samples with ``image``, ``nouns``, ``boxes``, ``caption``, ``seed``, ``index`` and
    ``background``; ``nouns`` is their noun vocabulary (the categories); ``attribution`` the
    image credit figures print under them."""

    make: Callable[..., list]
    nouns: tuple[str, ...]
    attribution: str = ""


# zero-argument callables that give the scene source (called on first use, so that registering
# loads no scene code); the last registered wins. mmneurons_utils.tiny.registry registers the
# embedded scenes when the package is imported.
_SCENE_SOURCES: list[Callable[[], SceneSource]] = []


def register_scene_source(source: Callable[[], SceneSource]) -> None:
    """Make ``source()`` the :class:`SceneSource` that ``load_images(images=None)`` draws from."""
    _SCENE_SOURCES.append(source)


def scene_source() -> SceneSource:
    """The registered :class:`SceneSource`; :class:`DatasetError` when none is."""
    if not _SCENE_SOURCES:
        raise DatasetError("no generated scenes are registered (import mmneurons_utils registers the "
                           "embedded ones); pass images=<folder>")
    return _SCENE_SOURCES[-1]()


@dataclass
class Sample:
    """One image of a folder: ``name`` (file name), ``nouns`` (its annotated object names,
    ``[]`` when there are no annotations), ``boxes`` (``(name, (x0, y0, x1, y1))``) and
    ``caption`` (``None``: folders carry no reference captions)."""

    image: Image.Image
    name: str
    nouns: list[str] = field(default_factory=list)
    boxes: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)
    caption: str | None = None


class ImageSet(list):
    """A list of samples (``Scene`` or :class:`Sample`) plus where they came from.

    ``kind``: ``"scenes"`` or ``"folder"``; ``source``: one line for the notebooks; ``key``: a
    short, stable name of exactly these images (caches and titles: ``"scenes n=128 seed=0"``);
    ``categories``: the annotation's category names (scenes: their noun vocabulary; a bare
    folder: none); ``has_boxes`` / ``has_nouns``: whether object boxes / the objects present
    are known; ``has_captions``: whether reference captions are (scenes only).
    """

    def __init__(self, samples: Iterable, kind: str, source: str, key: str,
                 categories: Sequence[str] = (), has_boxes: bool = False, has_nouns: bool = False,
                 notes: Sequence[str] = ()):
        super().__init__(samples)
        self.kind, self.source, self.key = kind, source, key
        self.categories = list(categories)
        self.has_boxes, self.has_nouns = has_boxes, has_nouns
        self.has_captions = kind == "scenes"
        self.notes = list(notes)
        self.attribution = attribution_of(self)

    def __getitem__(self, index):
        """An item, or for a slice an :class:`ImageSet` with the same labels (``data[:8]``)."""
        if isinstance(index, slice):
            part = ImageSet(super().__getitem__(index), self.kind, self.source,
                            f"{self.key} [{_slice_text(index)}]",
                            categories=self.categories, has_boxes=self.has_boxes,
                            has_nouns=self.has_nouns, notes=self.notes)
            return part
        return super().__getitem__(index)

    @property
    def images(self) -> list[Image.Image]:
        return [s.image for s in self]

    @property
    def names(self) -> list[str]:
        """One name per image: the file name, or ``scene-<seed>-<index>`` for a scene."""
        return [getattr(s, "name", None) or f"scene-{s.seed}-{s.index}" for s in self]

    def candidate_nouns(self) -> list[str]:
        """The annotation categories as candidate caption nouns (:func:`candidate_words`)."""
        return candidate_words(self.categories)

    def summary(self) -> str:
        """One line: the source, how many images, and which metrics its labels allow."""
        boxes = ("object boxes: yes" if self.has_boxes else
                 "no object boxes (mass in box and pointing are skipped)")
        line = f"{self.source}: {len(self)} images; {boxes}"
        return "; ".join([line] + self.notes)


def _slice_text(index: slice) -> str:
    return ":".join("" if v is None else str(v) for v in (index.start, index.stop, index.step))


def prepare_model(vlm, data: ImageSet) -> str:
    """Give ``vlm`` the annotation categories as candidate nouns (used only by a real model
    without a tagger) and say where its caption nouns come from, in one line."""
    if data.categories and vlm.noun_vocabulary is None:
        vlm.candidate_nouns = data.candidate_nouns()
    return f"{vlm.name}: caption nouns from {vlm.noun_source}"


def is_scene(sample) -> bool:
    """Whether ``sample`` is one of the embedded scenes (it has a seed and a background)."""
    return hasattr(sample, "background") and hasattr(sample, "seed")


def attribution_of(samples) -> str:
    """The image credit figures of ``samples`` print: the OpenMoji credit for scenes, none
    for other images."""
    if samples and all(is_scene(s) for s in samples):
        return scene_source().attribution
    return ""


def label_of(sample, index: int) -> str:
    """A short name for a picker: ``"3: a dog on a red background"`` / ``"3: photo.jpg"``."""
    return f"{index}: {getattr(sample, 'caption', None) or getattr(sample, 'name', 'image')}"


def unmatched_nouns(captions, data: ImageSet) -> dict[str, int]:
    """Caption nouns that name no category of ``data`` → how many captions said them
    (empty when ``data`` has no categories to match against)."""
    if not data.categories:
        return {}
    counts: dict[str, int] = {}
    for caption in captions:
        for noun in caption.nouns:
            if match_category(noun, data.categories) is None:
                counts[noun] = counts.get(noun, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def load_images(images: str | Path | None = None, annotations: str | Path | None = None,
                n: int | None = None, seed: int = 0) -> ImageSet:
    """The images to study (see the module docstring): the embedded scenes when ``images``
    is empty, else the folder ``images``, with ``annotations`` (COCO instances JSON) when given.

    ``n``: how many (scenes: default 24; folder: the first ``n`` by file name, default all;
    only those are read). Hidden files (``.…``, e.g. macOS ``._IMG.jpg``) are left out.
    Raises :class:`DatasetError` for a missing or empty folder, an image that cannot be read,
    an annotation file that is not COCO instances JSON, or one that lists none of the images.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise DatasetError(f"n must be a positive integer or None, got {n!r}")
    if not images:
        if annotations:
            raise DatasetError("annotations were given without an image folder; pass images=<folder>")
        count, scenes = 24 if n is None else n, scene_source()
        return ImageSet(scenes.make(count, seed=seed), "scenes", f"embedded scenes (seed {seed})",
                        f"scenes n={count} seed={seed}", categories=list(scenes.nouns), has_boxes=True,
                        has_nouns=True)
    all_paths = image_files(images)
    paths = all_paths[:n] if n is not None else all_paths     # read only the images used
    try:
        files = [(p.name, read_image(p)) for p in paths]
    except ImageReadError as exc:
        raise DatasetError(str(exc)) from exc
    if not annotations:
        return ImageSet([Sample(image, name) for name, image in files], "folder", f"folder {images}",
                        f"folder {images} n={len(files)}")
    labels, categories, notes = read_coco_entries(Path(annotations).expanduser())
    by_base: dict[str, list[str]] = {}    # a file_name with a folder ("val2017/x.jpg") matches x.jpg
    for key in labels:
        by_base.setdefault(Path(key).name, []).append(key)
    samples, missing, outside, clipped, used = [], 0, [], [], set()
    for name, image in files:
        keys = [name] if name in labels else by_base.get(name, [])
        if len(keys) != 1:
            missing += 1
            samples.append(Sample(image, name))
            continue
        used.add(keys[0])
        size, objects = labels[keys[0]]
        boxes = image_boxes(objects, size, image, outside, clipped)
        nouns = list(dict.fromkeys(category for category, _ in boxes))
        samples.append(Sample(image, name, nouns, boxes))
    annotation_name = Path(annotations).name
    if missing == len(files):
        raise DatasetError(f"none of the {len(files)} images of {images} has an entry in {annotations} "
                           f"(its first file_name is {next(iter(labels), None)!r}, the folder's first "
                           f"image {files[0][0]!r}); is it this folder's annotation file?")
    notes += _annotation_notes(annotation_name, missing, outside, clipped,
                               _absent_files(labels, all_paths))
    return ImageSet(samples, "folder", f"folder {images} with {annotation_name}",
                    f"folder {images} n={len(files)} annotations {annotation_name}",
                    categories=categories, has_boxes=True, has_nouns=True, notes=notes)


def _absent_files(labels: dict, paths: Sequence[Path]) -> list[str]:
    """The annotated file names that no image file of the folder matches."""
    present = {p.name for p in paths}
    return [key for key in labels if key not in present and Path(key).name not in present]


def _annotation_notes(name: str, missing: int, outside: list, clipped: list, absent: list) -> list[str]:
    """One line per kind of problem the annotations have that still lets them be used."""
    def first(items):
        return f"{items[0]}{', …' if len(items) > 1 else ''}"

    notes = []
    if missing:
        notes.append(f"{missing} image(s) have no entry in {name} (no boxes for them)")
    if absent:
        notes.append(f"{len(absent)} entries of {name} name files that are not in the folder "
                     f"({first(absent)})")
    if outside:
        notes.append(f"{len(outside)} box(es) of {name} lie outside their image and were dropped "
                     f"({first(outside)})")
    if clipped:
        notes.append(f"{len(clipped)} box(es) of {name} reach past their image's edge and were "
                     f"clipped ({first(clipped)})")
    return notes


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (by suffix; hidden files left out), sorted by
    name; :class:`DatasetError` when it is not a folder or holds none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder" + ("" if folder.exists() else " (it does not exist)"))
    candidates = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith(".")]
    broken = sorted(p for p in candidates if p.is_symlink() and not p.exists())
    if broken:    # a dangling link is an image that cannot be read, as a 0-byte file is
        raise DatasetError(f"image {broken[0]} is a broken symbolic link (to {os.readlink(broken[0])}, "
                           f"which does not exist){f' (and {len(broken) - 1} more)' if len(broken) > 1 else ''}; "
                           "fix or remove it")
    files = sorted(p for p in candidates if p.is_file())
    if not files:
        raise DatasetError(f"{folder} holds no images (accepted: {', '.join(IMAGE_SUFFIXES)})")
    return files


EXPORT_MARKER = ".mmneurons-export"   # in a folder being written by write_image_folder, until it is whole


def write_image_folder(samples: Sequence, folder: str | Path, annotations: bool = True,
                       categories: Sequence[str] | None = None) -> Path:
    """Write ``samples`` (e.g. scenes) as ``image_0000.png`` … into the new or empty folder
    ``folder``, with a COCO ``annotations.json`` of their boxes when ``annotations``.

    ``categories``: the category names to list (default: the names in the samples' boxes;
    e.g. the scenes' whole noun vocabulary keeps it as the folder's categories). PNG is
    lossless, so the folder's images are the samples' pixels: the folder path gives the
    same numbers as the samples themselves. Returns ``folder``.

    The folder is checked first (writable, room for the images); each file is written to a
    temporary file and renamed, ``annotations.json`` last. A failed or interrupted write
    removes what it wrote; one killed outright leaves the marker :data:`EXPORT_MARKER`, and
    the next write into that folder starts it again.
    """
    folder = output_path(folder)      # a symbolic link to a folder: the folder
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"{folder} exists and is not a folder; choose a new folder")
    interrupted = folder.is_dir() and (folder / EXPORT_MARKER).is_file()
    if folder.exists() and any(folder.iterdir()) and not interrupted:
        raise DatasetError(f"{folder} exists and is not empty; choose a new folder")
    in_boxes = {name for s in samples for name, _ in s.boxes}
    names = list(dict.fromkeys(categories)) if categories is not None else sorted(in_boxes)
    if in_boxes - set(names):
        raise DatasetError(f"the boxes name {sorted(in_boxes - set(names))}, which categories lacks")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    check_writable_folder(existing, f"{folder}" if existing == folder else
                          f"folder {existing} (where {folder} would be made)")
    check_free_space(existing, sum(s.image.width * s.image.height * 3 + 200 for s in samples),
                     f"writing {len(samples)} images to {folder}")
    created = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    if interrupted:                   # an export killed half-way: only its own files are there
        for path in folder.iterdir():
            if path.is_file() and path.name != EXPORT_MARKER:
                path.unlink()
    marker = folder / EXPORT_MARKER
    written: list[Path] = []
    try:
        marker.write_text("an export of mmneurons_utils.data.datasets.write_image_folder in progress\n")
        ids = {name: i + 1 for i, name in enumerate(names)}
        coco = dict(images=[], annotations=[], categories=[dict(id=i, name=n) for n, i in ids.items()])
        digits = max(4, len(str(len(samples) - 1)))        # file names sort in sample order
        for index, sample in enumerate(samples):
            file_name = f"image_{index:0{digits}d}.png"
            written.append(atomic_write(folder / file_name,
                                        lambda tmp, image=sample.image: image.save(tmp, format="PNG")))
            coco["images"].append(dict(id=index, file_name=file_name, width=sample.image.width,
                                       height=sample.image.height))
            for name, (x0, y0, x1, y1) in sample.boxes:
                coco["annotations"].append(dict(id=len(coco["annotations"]) + 1, image_id=index,
                                                category_id=ids[name], bbox=[x0, y0, x1 - x0, y1 - y0],
                                                area=(x1 - x0) * (y1 - y0), iscrowd=0))
        if annotations:               # last: a folder with annotations.json is whole
            written.append(atomic_write_text(folder / "annotations.json", json.dumps(coco)))
        marker.unlink()
    except BaseException:             # a full disk, Ctrl-C: nothing of this run is left
        for path in written + [marker]:
            try:
                path.unlink()
            except OSError:
                pass
        for path in created:          # folders this call made, innermost first
            try:
                path.rmdir()
            except OSError:
                break
        raise
    return folder
