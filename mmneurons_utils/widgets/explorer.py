"""The neuron browser: pick an image and a noun; its top units; a unit's heatmap and top tokens.

    ident = identify(vlm, scenes.images, image_activations=True, ...)   # or session.identify(scenes)
    explorer = NeuronExplorer(vlm, scenes, ident, top_k=10)
    view = explorer.view()      # static default state: caption, units table, figures
    explorer.show()             # live controls (a kernel front end needed)

Live panel: an :class:`~.pickers.ImagePicker` (scene by seed/index, or an upload), the
caption with a :class:`~.pickers.TokenPicker` of its nouns, the noun's top units as a
clickable list (rank, layer.unit with its polarity, contribution score, first top tokens),
and for the selected unit its activation map over the image (upsampled, 95th-percentile
mask as a contour, the noun's box dashed on scenes) and its top tokens. A unit is shown in
the direction it writes the noun: ``L3.741 (−)`` writes it through ``−W_out[:, i]``, so its
map is ``−a`` and its top tokens are the top of ``−W_U · W_out[:, i]``. Models whose image tokens
are not a patch grid (InstructBLIP's queries) show the units and top tokens, no map.

Opt-in, the selected unit's **dataset strip** (its top images over a dataset, in its
polarity, each with its map; :meth:`NeuronExplorer.dataset_strip`): ``examples=True``
gathers the examples of every unit over the picker's scenes (read from the identification's
activations when it holds them all, else one prefill pass, on the first strip), or pass a
:class:`~mmneurons_utils.atlas.examples.UnitExamples` (e.g. an atlas run's
``parts["examples"]``) with ``example_images``, the images (or scenes) it indexes. Each
unit's strip is drawn once (one figure; a prefill of the images the identification lacks) and kept.

The browser reads everything about the scenes from their
:class:`~mmneurons_utils.method.identification.Identification` (captions, activations, the
``contribution`` units): a change to one of its images captions and identifies nothing, it
reads the rows and renders one heatmap. Only an image it does not hold (an upload, scenes
redrawn with another seed) costs one captioning pass with activations recorded (the scores
and the maps share it). ``last_update_s`` holds the time of the last change.
"""

from __future__ import annotations

import html
import io
import time
from typing import NamedTuple

import ipywidgets as W
from IPython.display import display

from ..method.units import Unit
from ..data.objects import boxes_for
from .pickers import ImagePicker, TokenPicker
from ..properties import specificity
from ..atlas.examples import UnitExamples, covered_images, dataset_examples, identification_examples
from ..method.identification import Identification
from ..method.identify import check_top_k, find_neurons
from .. import plots
from ..plots.atlas import example_strip


class BrowserView(NamedTuple):
    """The static state of the browser (what papermill stores)."""

    caption: str
    table: "object"           # pandas.DataFrame: the noun's top units
    bars: "object"            # matplotlib Figure: their contribution scores, or None
    heatmap: "object"         # matplotlib Figure: the selected unit's map, or None
    unit: dict                # the selected unit: noun, rank, layer, unit, polarity, score, top_tokens
    strip: "object" = None    # matplotlib Figure: its dataset strip (``examples`` given), or None


class NeuronExplorer:
    """Browse the multi-modal neurons of one image.

    ``scenes``: the scenes (or images of an ``ImageSet``) to pick from; ``ident``: their
    :class:`Identification` (its images are the first ``ident.n_images`` scenes, checked by
    content; made with ``image_activations=True`` and the ``contribution`` method; ``top_k`` at
    most its ``top_k``): the captions, maps and units of those scenes are read from it.
    ``top_k``: the units listed per noun. ``index``: the starting scene (default: the first
    whose caption names something). ``image`` and ``noun`` are the two dropdowns (kept for
    scripts that set them).

    ``examples``: show the selected unit's dataset strip (``strip_n`` images): ``True`` for
    the picker's scenes (gathered once per scene list), or a ``UnitExamples`` whose image
    indices name ``example_images`` (images or scenes; default the picker's scenes). Off
    (``None``) by default: the strip costs a prefill of its images per new unit.
    """

    def __init__(self, vlm, scenes, ident: Identification, top_k: int = 10, seed: int = 0,
                 index: int | None = None, heat_px: int = 200, examples=None,
                 example_images=None, strip_n: int = 6):

        if not isinstance(ident, Identification):
            raise TypeError(f"NeuronExplorer takes the scenes' Identification, got {type(ident).__name__}")
        self.vlm, self.top_k, self.heat_px = vlm, check_top_k(vlm, top_k), heat_px
        if "contribution" not in set(ident.table["method"]):
            raise ValueError("the identification has no contribution units; identify with "
                             "methods including 'contribution'")
        held = ident.top_k or top_k           # 0: nothing recorded, nothing to check against
        if top_k > held:
            raise ValueError(f"top_k={top_k} but the identification holds the top {held} units per "
                             "noun; identify with a larger top_k")
        self.grid = specificity.patch_grid(vlm)
        self.picker = ImagePicker(scenes, seed=seed)
        self.ident, self._covered = ident, covered_images(ident, [s.image for s in self.picker.scenes])
        self._ident_seed = self.picker.seed.value
        self._contribution = ident.table[(ident.table["method"] == "contribution")
                                         & (ident.table["rank"] < top_k)]
        if not (examples is None or examples is True or isinstance(examples, UnitExamples)):
            raise ValueError(f"examples must be None, True or a UnitExamples, got {type(examples).__name__}")
        if example_images is not None and not isinstance(examples, UnitExamples):
            raise ValueError("example_images names the images of a UnitExamples: pass examples too")
        if isinstance(examples, UnitExamples):
            example_images = list(example_images if example_images is not None else self.picker.scenes)
            if len(example_images) < examples.n_images:
                raise ValueError(f"examples index {examples.n_images} images, example_images has "
                                 f"only {len(example_images)}")
        if isinstance(strip_n, bool) or not isinstance(strip_n, int) or strip_n < 1:
            raise ValueError(f"strip_n must be a positive integer, got {strip_n!r}")
        self._given_examples, self._example_images = examples, example_images
        self.strip_n, self._strips = strip_n, {}
        self.strip = W.Image(format="png") if examples is not None else None
        if self.strip is not None:
            self.strip.add_class("mmn-strip")
        if index is None:
            index = next((i for i, c in enumerate(ident.captions) if c.nouns), 0)
        self.tokens = TokenPicker(vlm)
        self.units = W.Select(options=[], rows=min(top_k, 12), layout=W.Layout(width="360px"))
        self.heatmap = W.Image(format="png", width=heat_px)
        self.unit_info = W.HTML(layout=W.Layout(width="360px"))
        self.status = W.HTML()
        for control, name in ((self.units, "mmn-units"), (self.heatmap, "mmn-heatmap"),
                              (self.unit_info, "mmn-unit"), (self.status, "mmn-status")):
            control.add_class(name)
        self.image, self.noun = self.picker.index, self.tokens.dropdown   # the two dropdowns
        self._caption = self._table = None
        self._shown = False          # live widgets are rendered only once on screen
        self.last_update_s = None
        with self.picker._hold():
            self.picker.select(index)
        self.picker.observe(lambda _: self._image_changed())
        self.tokens.observe(lambda _: self._noun_changed())
        self.units.observe(lambda _: self._unit_changed(), names="value")

    # -- state ------------------------------------------------------------------------
    def ident_image(self) -> int | None:
        """The picked image's position in the identification (``None``: an upload, scenes
        redrawn with another seed, or a scene after the identified ones)."""
        index = self.picker.index.value
        if index < 0 or index >= self._covered or self.picker.seed.value != self._ident_seed:
            return None
        return index

    def _analyse(self):
        """The picked image's caption and units: the identification's, or for an image it does
        not hold, one captioning pass (activations at the image tokens too) and its scores."""

        index = self.ident_image()
        if index is not None:
            self._caption = self.ident.captions[index]
            self._table = self._contribution[self._contribution["image"] == index]
            return
        image = self.picker.image
        captions = self.vlm.describe([image], activation="down_proj_input",
                                     max_new_tokens=int(self.ident.settings.get("max_new_tokens", 20)),
                                     image_activations=self.grid is not None)
        self._caption = captions[0]
        self._table = find_neurons(self.vlm, image, top_k=self.top_k, captions=captions)

    def _ensure(self):
        if self._table is None:
            self._analyse()
            with self.tokens._hold():
                self.tokens.set_caption(self._caption, self._nouns())
            self._fill_units()

    def _nouns(self) -> list[str]:
        return list(dict.fromkeys(self._table.noun))

    def rows(self):
        """The picked noun's top units (``rank, layer, unit, polarity, score, top_tokens``)."""
        self._ensure()
        rows = self._table[self._table.noun == self.tokens.value].sort_values("rank", kind="stable")
        return rows[["rank", "layer", "unit", "polarity", "score", "top_tokens"]].reset_index(drop=True)

    def selected(self) -> dict | None:
        """The selected unit as a dict (``noun, rank, layer, unit, polarity, score, top_tokens``)."""
        rows = self.rows()
        if not len(rows):
            return None
        rank = self.units.value if self.units.value is not None else 0
        row = rows.iloc[min(int(rank), len(rows) - 1)]
        return {"noun": self.tokens.value, "rank": int(row["rank"]), "layer": int(row.layer),
                "unit": int(row.unit), "polarity": int(row.polarity), "score": float(row.score),
                "top_tokens": list(row.top_tokens)}

    def _model_view(self):
        """The picked image as the model sees its layout (centre square if the processor crops)."""
        image = self.picker.image
        processor = getattr(getattr(self.vlm, "processor", None), "image_processor", None)
        if getattr(processor, "do_center_crop", False) and image.width != image.height:
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        return image

    def heatmap_figure(self, unit: dict | None = None):
        """The unit's activation map over the image (``None`` without a patch grid)."""

        unit = unit or self.selected()
        if unit is None or self.grid is None:
            return None
        image = self._model_view()
        grid_map = specificity.unit_maps(self.vlm, self._caption.activations,
                                         [(unit["layer"], unit["unit"])], [unit["polarity"]])[0]
        heat = specificity.upsample(grid_map, (image.height, image.width), smooth=True)
        scene = self.picker.scene
        boxes = boxes_for(scene, unit["noun"]) if scene else None
        return plots.heatmap_overlay(image, heat, specificity.percentile_mask(heat, 95),
                                     title=f"{str(Unit.of(unit))} on '{unit['noun']}'",
                                     boxes=boxes)

    def _strip_source(self, n: int, examples: int):
        """``(UnitExamples, images, captions or None)`` the strips are drawn from."""

        given = self._given_examples
        if given is not None and given is not True:
            items, found = self._example_images, given
        else:   # the picker's scenes, gathered once per scene list
            items = self.picker.scenes
            cached = getattr(self, "_examples", None)
            if cached is None or cached[0] is not items or cached[1].examples < n:
                whole = (self.picker.seed.value == self._ident_seed
                         and self._covered == len(items))   # the identification holds them all
                self._examples = (items, identification_examples(self.ident, max(examples, n)) if whole
                                  else dataset_examples(self.vlm, [s.image for s in items],
                                                        examples=max(examples, n)))
            found = self._examples[1]
        samples = all(hasattr(item, "image") for item in items)
        images = [item.image for item in items] if samples else items
        captions = [getattr(item, "caption", None) for item in items] if samples else []
        return found, images, (captions if captions and all(captions) else None)

    def dataset_strip(self, unit: dict | None = None, n: int = 6, examples: int = 8):
        """The unit's strip of dataset examples: its top ``n`` images (by ``max p · a`` over
        the image tokens, in its polarity), each with its map; see
        :func:`mmneurons_utils.plots.atlas.example_strip`. The images are the given
        ``example_images`` of the constructor's ``UnitExamples``, else the picker's scenes,
        whose examples (``examples`` per unit) are gathered once per scene list (one prefill
        pass over the scenes)."""

        unit = unit or self.selected()
        if unit is None:
            return None
        found, images, captions = self._strip_source(n, examples)
        indices, scores = found.top(unit["layer"], unit["unit"], unit["polarity"])
        row = dict(unit, example_images=indices[:n], example_scores=scores[:n])
        return example_strip(self.vlm, images, row, n=n, captions=captions,
                             attribution=self.picker.attribution, ident=self._strip_ident(images))

    def _strip_ident(self, images):
        """The identification when the strip's images start with its images (their maps are read
        from it), else ``None``."""
        given = self._given_examples
        if given is not None and given is not True:      # a UnitExamples over other images
            if not hasattr(self, "_examples_ident"):
                try:
                    self._examples_ident = self.ident if covered_images(self.ident, images) else None
                except ValueError:
                    self._examples_ident = None
            return self._examples_ident
        return self.ident if self.picker.seed.value == self._ident_seed and self._covered else None

    def _strip_png(self, unit: dict | None) -> bytes:
        """The unit's strip as PNG bytes, drawn once per unit (and example source)."""
        import matplotlib.pyplot as plt

        if unit is None:
            return _placeholder(self.heat_px, "no unit")
        source = self._given_examples if self._given_examples is not True else self.picker.scenes
        if source is not getattr(self, "_strips_of", None):   # another scene list: start afresh
            self._strips, self._strips_of = {}, source
        key = (unit["noun"], unit["layer"], unit["unit"], unit["polarity"])
        if key not in self._strips:
            fig = self.dataset_strip(unit, n=self.strip_n)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
            plt.close(fig)
            if len(self._strips) >= 64:
                self._strips.pop(next(iter(self._strips)))
            self._strips[key] = buffer.getvalue()
        return self._strips[key]

    def view(self) -> BrowserView:
        """The current choice as static output: caption, units table, bars, heatmap, unit
        and, with ``examples``, the unit's dataset strip."""

        rows = self.rows()
        unit = self.selected()
        bars = plots.neuron_bars(self._table, self.tokens.value) if len(rows) else None
        strip = self.dataset_strip(unit, n=self.strip_n) if self.strip is not None and unit else None
        return BrowserView(self._caption.text, rows, bars, self.heatmap_figure(unit), unit or {}, strip)

    # -- events -----------------------------------------------------------------------
    def _image_changed(self):
        start = time.perf_counter()
        self._analyse()
        with self.tokens._hold():
            self.tokens.set_caption(self._caption, self._nouns())
        self._fill_units()
        self._render(start)

    def _noun_changed(self):
        start = time.perf_counter()
        self._ensure()
        self._fill_units()
        self._render(start)

    def _unit_changed(self):
        if not self._filling:
            self._render(time.perf_counter())

    _filling = False

    def _fill_units(self):
        rows = self.rows()
        options = [(f"{int(r['rank']):>2}  {str(Unit.of(r)):<11} {r.score:+8.3f}  "
                    f"{', '.join(list(r.top_tokens)[:3])}", int(r['rank'])) for _, r in rows.iterrows()]
        self._filling = True
        try:
            self.units.options = options
            self.units.value = options[0][1] if options else None
        finally:
            self._filling = False

    def _render(self, start: float):
        if not self._shown:
            return
        import matplotlib.pyplot as plt

        self.tokens.caption_html.value = self.tokens.html()
        unit = self.selected()
        fig = self.heatmap_figure(unit)
        if fig is not None:
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=self.heat_px / fig.get_size_inches()[0],
                        bbox_inches="tight")
            plt.close(fig)
            self.heatmap.value = buffer.getvalue()
        else:
            self.heatmap.value = _placeholder(self.heat_px, "no patch grid" if self.grid is None
                                              else "no noun in this caption")
        self.unit_info.value = _unit_html(unit)
        if self.strip is not None:
            self.strip.value = self._strip_png(unit)
        self.last_update_s = time.perf_counter() - start
        self.status.value = (f"<small style='color:gray'>{self.picker.label} · "
                             f"updated in {self.last_update_s * 1000:.0f} ms</small>")

    def widget(self) -> W.Widget:
        header = W.HTML("<style>.mmn-units select {font-family: var(--jp-code-font-family, "
                        "monospace); font-size: 12px; white-space: pre}</style>"
                        "<b>top units</b> <small>(rank · layer.unit (polarity) · contribution · "
                        "top tokens)"
                        "</small>")
        strip = ([W.HTML("<b>top dataset images</b> <small>(the selected unit's, in its polarity, "
                         "each with its map)</small>"), self.strip]
                 if self.strip is not None else [])
        return W.VBox([self.picker.widget(), self.tokens.caption_html, self.tokens.dropdown,
                       W.HBox([W.VBox([header, self.units]), W.VBox([self.heatmap, self.unit_info])]),
                       *strip, self.status])

    def show(self) -> None:
        self._ensure()
        display(self.widget())
        self._shown = True
        self._render(time.perf_counter())


def _unit_html(unit: dict | None) -> str:
    if unit is None:
        return "<i>no unit</i>"
    tokens = ", ".join(f"<b>{html.escape(t)}</b>" if t == unit["noun"] else html.escape(t)
                       for t in unit["top_tokens"])
    return (f"<b>{html.escape(str(Unit.of(unit)))}</b> (rank {unit['rank']}, contribution "
            f"{unit['score']:+.3f} to '{html.escape(unit['noun'])}')<br>top tokens: {tokens}")


def _placeholder(px: int, text: str) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (px, px), "#eeeeee")
    ImageDraw.Draw(image).text((10, px // 2 - 6), text, fill="#666666")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["BrowserView", "NeuronExplorer"]
