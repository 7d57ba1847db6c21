"""Pickers shared by the panels: an image (a scene by seed and index, or an upload) and a noun.

Both follow the panels' pattern: ``view()`` is the static default state (what papermill
stores), ``show()`` displays the controls, ``widget()`` returns them for embedding in a
larger panel, ``observe(callback)`` calls ``callback(picker)`` once per change.
DOM classes (``mmn-seed``, ``mmn-image``, ``mmn-upload``, ``mmn-noun``, ``mmn-caption``)
let browser tests find the controls.
"""

from __future__ import annotations

import html
import io
from contextlib import contextmanager
from typing import Callable, Sequence

import ipywidgets as W
from IPython.display import display
from PIL import Image

from ..data.datasets import attribution_of, is_scene, label_of
from ..store.provenance import image_hash
from ..tiny.scenes import make_scenes


def png_bytes(image: Image.Image, size: int | None = None) -> bytes:
    """``image`` as PNG, upscaled without smoothing so its longest side is ``size`` px."""
    if size is not None and max(image.size) != size:
        scale = size / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class _Observable:
    def __init__(self):
        self._callbacks: list[Callable] = []
        self._silent = 0

    def observe(self, callback: Callable) -> None:
        """Call ``callback(self)`` after every change of the picked value."""
        self._callbacks.append(callback)

    @contextmanager
    def _hold(self):
        self._silent += 1
        try:
            yield
        finally:
            self._silent -= 1

    def _fire(self) -> None:
        if not self._silent:
            for callback in self._callbacks:
                callback(self)


class ImagePicker(_Observable):
    """A scene of ``make_scenes(n, seed)`` chosen by index, or an uploaded image.

    ``scenes``: start from these (their seed is shown); otherwise ``make_scenes(n, seed)``.
    Changing the seed redraws the ``n`` scenes and keeps the index. An upload (any format
    PIL reads; converted to RGB, resized by the model's processor) is added to the list as
    ``upload: <file name>`` and selected. ``image`` is the picked PIL image, ``scene`` the
    picked ``Scene`` (``None`` for an upload).
    """

    def __init__(self, scenes: Sequence | None = None, seed: int = 0, n: int = 24, index: int = 0,
                 thumbnail: int = 128):
        super().__init__()

        self._make = make_scenes
        self.scenes = list(scenes) if scenes is not None else make_scenes(n, seed)
        if not self.scenes:
            raise ValueError("ImagePicker needs at least one scene")
        self.redraws = all(is_scene(s) for s in self.scenes)   # a folder's images have no seed
        self.attribution = attribution_of(self.scenes)
        self.thumbnail = thumbnail
        self._uploads: dict[int, tuple[str, Image.Image]] = {}   # option value (< 0) → upload
        self.seed = W.BoundedIntText(value=getattr(self.scenes[0], "seed", seed), min=0,
                                     max=2**31 - 1, description="seed",
                                     layout=W.Layout(width="170px"), disabled=not self.redraws)
        self.index = W.Dropdown(options=self._options(), value=index, description="image",
                                layout=W.Layout(width="430px"))
        self.upload = W.FileUpload(accept="image/*", multiple=False, description="upload")
        self.preview = W.Image(value=png_bytes(self.image, thumbnail), format="png")
        for control, name in ((self.seed, "mmn-seed"), (self.index, "mmn-image"),
                              (self.upload, "mmn-upload"), (self.preview, "mmn-preview")):
            control.add_class(name)
        self.seed.observe(lambda _: self._seed_changed(), names="value")
        self.index.observe(lambda _: self._changed(), names="value")
        self.upload.observe(lambda _: self._uploaded(), names="value")

    # -- the picked value -------------------------------------------------------------
    @property
    def image(self) -> Image.Image:
        value = self.index.value
        return self._uploads[value][1] if value < 0 else self.scenes[value].image

    @property
    def scene(self):
        value = self.index.value
        return None if value < 0 else self.scenes[value]

    @property
    def label(self) -> str:
        value = self.index.value
        if value < 0:
            return f"upload: {self._uploads[value][0]}"
        if not self.redraws:
            return f"image {value} ({getattr(self.scenes[value], 'name', value)})"
        return f"scene {value} (seed {self.seed.value})"

    def select(self, index: int) -> None:
        """Pick scene ``index`` (or an upload's negative option value)."""
        self.index.value = index

    def add_image(self, image: Image.Image, name: str = "image") -> None:
        """Add an image as if uploaded, and pick it."""
        key = -(len(self._uploads) + 1)
        self._uploads[key] = (name, image.convert("RGB"))
        with self._hold():
            self.index.options = self._options()
        self.index.value = key        # a new (negative) value: one change event

    # -- events -----------------------------------------------------------------------
    def _options(self):
        scenes = [(label_of(s, i), i) for i, s in enumerate(self.scenes)]
        return scenes + [(f"upload: {name}", key) for key, (name, _) in self._uploads.items()]

    def _seed_changed(self):
        if not self.redraws:
            return
        keep = self.index.value
        self.scenes = self._make(len(self.scenes), int(self.seed.value))
        with self._hold():
            self.index.options = self._options()
            self.index.value = keep if keep in dict(self._options()).values() else 0
        self._changed()

    def _uploaded(self):
        files = self.upload.value
        if not files:
            return
        item = files[-1]
        image = Image.open(io.BytesIO(bytes(item["content"])))
        self.add_image(image, item.get("name", "upload"))

    def _changed(self):
        if self._silent:
            return
        self.preview.value = png_bytes(self.image, self.thumbnail)
        self._fire()

    # -- display ----------------------------------------------------------------------
    def widget(self) -> W.Widget:
        return W.HBox([self.seed, self.index, self.upload])

    def view(self):
        """The picked image, upscaled to the thumbnail size, as one PNG (static output)."""
        from IPython.display import Image as PNG

        return PNG(data=png_bytes(self.image, self.thumbnail), format="png")

    def show(self) -> None:
        display(W.VBox([self.widget(), self.preview]))


class TokenPicker(_Observable):
    """One noun of a caption. ``set_image`` captions an image with ``vlm``; ``set_caption``
    takes a ``Caption`` (or a string and its nouns). The caption is shown with its nouns in
    bold (``caption_html``, DOM class ``mmn-caption``); ``value`` is the picked noun.
    :meth:`link` follows an :class:`ImagePicker`, reading the captions of the images an
    :class:`~mmneurons_utils.method.identification.Identification` holds from it."""

    def __init__(self, vlm=None, image: Image.Image | None = None, caption=None,
                 nouns: Sequence[str] | None = None, description: str = "noun"):
        super().__init__()
        self.vlm = vlm
        self.ident = None
        self.caption = None
        self.dropdown = W.Dropdown(options=[], description=description,
                                   layout=W.Layout(width="220px"))
        self.caption_html = W.HTML()
        self.dropdown.add_class("mmn-noun")
        self.caption_html.add_class("mmn-caption")
        self.dropdown.observe(lambda _: self._changed(), names="value")
        if caption is not None:
            self.set_caption(caption, nouns)
        elif image is not None:
            self.set_image(image)

    @property
    def value(self) -> str | None:
        return self.dropdown.value

    @property
    def nouns(self) -> list[str]:
        return list(self.dropdown.options)

    @property
    def text(self) -> str:
        return getattr(self.caption, "text", self.caption) or ""

    def set_image(self, image: Image.Image):
        """Caption ``image`` with the picker's model and offer its nouns; returns the Caption."""
        if self.vlm is None:
            raise ValueError("TokenPicker.set_image needs a model: TokenPicker(vlm, ...)")
        caption = self.vlm.describe([image])[0]
        self.set_caption(caption)
        return caption

    def set_caption(self, caption, nouns: Sequence[str] | None = None) -> None:
        """Offer the nouns of ``caption`` (a ``Caption``, or a string with ``nouns``)."""
        nouns = list(dict.fromkeys(nouns if nouns is not None else getattr(caption, "nouns", [])))
        keep = self.dropdown.value
        self.caption = caption
        with self._hold():
            self.dropdown.options = nouns
            self.dropdown.value = keep if keep in nouns else (nouns[0] if nouns else None)
        self.caption_html.value = self.html()
        self._fire()

    def link(self, picker: ImagePicker, ident=None) -> "TokenPicker":
        """Follow ``picker``: offer the nouns of each picked image's caption (now and on every
        change). ``ident``: the :class:`~mmneurons_utils.method.identification.Identification`
        of the picker's first scenes (checked by content): their captions are read from it,
        only other images (uploads, another seed) are captioned with the picker's model."""
        covered = 0 if ident is None else _covered_by_hash(ident, picker)
        self.ident, seed = ident, picker.seed.value

        def follow(p):
            index = p.index.value
            if 0 <= index < covered and p.seed.value == seed:
                self.set_caption(ident.captions[index])
            else:
                self.set_image(p.image)

        picker.observe(follow)
        follow(picker)
        return self

    def select(self, noun: str) -> None:
        self.dropdown.value = noun

    def html(self) -> str:
        """The caption with its nouns in bold and the picked one underlined."""
        words = []
        for word in self.text.split():
            bare = word.strip(",.;:!?")
            if bare in self.dropdown.options:
                style = "text-decoration:underline" if bare == self.value else ""
                word = html.escape(word).replace(html.escape(bare),
                                                 f"<b style='{style}'>{html.escape(bare)}</b>", 1)
            else:
                word = html.escape(word)
            words.append(word)
        return f"<span>caption: {' '.join(words) or '<i>(none)</i>'}</span>"

    def _changed(self):
        if self._silent:
            return
        self.caption_html.value = self.html()
        self._fire()

    def widget(self) -> W.Widget:
        return W.VBox([self.caption_html, self.dropdown])

    def view(self) -> str:
        """``caption: … | nouns: …`` for the current caption (static output)."""
        return f"caption: {self.text} | nouns: {', '.join(self.nouns) or '(none)'}"

    def show(self) -> None:
        display(self.widget())


def _covered_by_hash(ident, picker: ImagePicker) -> int:
    """``ident.n_images`` when its images are the picker's first scenes (content hashes)."""
    n = ident.n_images
    hashes = ident.identity.get("images")
    images = [s.image for s in picker.scenes[:n]]
    if len(images) < n or (hashes is not None and [image_hash(i) for i in images] != list(hashes)):
        raise ValueError(f"the identification's {n} images are not the picker's first scenes")
    return n
