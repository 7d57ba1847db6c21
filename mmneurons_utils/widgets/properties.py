"""Panels for the properties notebooks: where a noun's neurons fire, and what survives a shuffle.

* :class:`SpecificityPanel` — image, noun, method, ``k`` → the top unit's and the
  top-``k`` mean activation maps over the image with their 95th-percentile masks,
  mass in box and pointing, and the units' top tokens scored against the noun.
* :class:`InvariancePanel` — image, permutation seed, ``k`` → the caption before and
  after shuffling the image tokens, and the share of each noun's top-``k`` units kept.

Both take the notebook's :class:`~mmneurons_utils.method.identification.Identification` of
``scenes`` (``ident``): a picked scene's units and caption are read from it; only an upload (or
scenes redrawn with another seed) is identified here, once per image.

Both follow the panels' pattern (:class:`~.panel.Panel`): ``view()`` returns the default
state's static output (what papermill stores), ``show()`` displays the controls and
renders on change.
"""

from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..data.objects import boxes_for
from .panel import Panel
from ..method.identification import Identification
from ..method.identify import METHODS, find_neurons_by_method
from .. import plots
from ..properties import specificity
from ..properties.sensitivity import candidate_text
from ..properties.invariance import permuted_image_tokens, region_invariance


class SpecificityPanel(Panel):
    """Pick an image, a noun of its caption, a method and ``k``; see where the units fire."""

    def __init__(self, vlm, scenes, ident: Identification | None = None, k: int = 10,
                 similarity=None):
        super().__init__(vlm, scenes)
        self.similarity = similarity
        self.ident = _checked(ident, scenes)
        methods = list(METHODS) if ident is None else \
            [m for m in ident.table["method"].unique() if m != "selection_null"]
        self.method = W.Dropdown(options=methods, value="contribution", description="method",
                                 layout=W.Layout(width="220px"))
        top = 50 if ident is None else int(ident.settings.get("top_k", 50))
        self.k = W.IntSlider(value=min(k, top), min=1, max=top, description="k")
        self._cache: dict = {}
        self.picker.observe(lambda _: self._image_changed())
        for control in (self.method, self.k):
            control.observe(self._render, names="value")
        self.nouns.observe(self._render)
        self._image_changed()

    def _image_changed(self):
        found = _of_image(self.ident, self.table_image())
        if found is None:
            key = (self.picker.label, id(self.picker.image))
            if key not in self._cache:
                self._cache = {key: find_neurons_by_method(self.vlm, [self.picker.image], top_k=50,
                                                           image_activations=True)}
            found = self._cache[key]
        self.table, self.caption = found.table, found.captions[0]
        self.nouns.set_caption(self.caption)  # fires the noun observer → render

    def view(self) -> list:
        """``[summary line, top-units table, heatmap figure or a note]`` for the current choice."""

        noun, k = self.nouns.value, self.k.value
        if noun is None:
            return [f"caption: {self.caption.text!r} names no noun; pick another image"]
        rows = self.table[(self.table.noun == noun) & (self.table.method == self.method.value)]
        rows = rows[rows["rank"] < k]
        tokens = candidate_text(rows.top_tokens, 3)
        line = f"caption: {self.caption.text} | noun: {noun} | top-{k} tokens: {tokens}"
        if self.similarity is not None and len(rows):   # per unit vs the noun, then averaged
            words = [candidate_text([t], 3) for t in rows.top_tokens]
            f1 = self.similarity.bertscore([w or "." for w in words], [noun] * len(words))
            f1 = float(np.mean([score if w else 0.0 for w, score in zip(words, f1)]))
            line += f" | BERTScore vs noun {f1:.3f} (per unit)"
        shown = rows[["rank", "layer", "unit", "polarity", "score", "top_tokens"]].head(10).round(3)
        if specificity.patch_grid(self.vlm) is None:
            return [line, shown, f"{self.vlm.arch.family}: image tokens are not a patch grid, "
                                 "so no heatmap over the image (selectivity only)"]
        image = self.picker.image
        size = (image.height, image.width)
        units = np.array(rows[["layer", "unit"]], dtype=np.int64)
        polarity = specificity.unit_polarity(rows)
        heats = specificity.mean_maps(self.vlm, self.caption.activations, units, (1, k), size,
                                      polarity=polarity)
        heats = {f"{title} ({self.method.value})": heat for title, heat in heats.items()}
        masks = {title: specificity.percentile_mask(heat) for title, heat in heats.items()}
        scene = self.picker.scene
        boxes = boxes_for(scene, noun) if scene is not None else []
        if boxes:
            grid = specificity.unit_maps(self.vlm, self.caption.activations, units, polarity).mean(0)
            scores = specificity.box_scores(grid, size, boxes)
            line += (f" | mass in box {scores['mass_in_box']:.2f} (chance {scores['box_share']:.2f}), "
                     f"pointing {'hit' if scores['pointing_hit'] else 'miss'}")
        fig = plots.heatmap_panels(image, heats, masks, boxes=boxes, noun=noun,
                                   attribution=self.picker.attribution)
        plt.close(fig)
        return [line, shown, fig]

    def controls(self) -> list:
        return [self.picker.widget(), W.HBox([self.nouns.widget(), self.method, self.k])]


class InvariancePanel(Panel):
    """Pick an image and a permutation seed; see the caption and the units after shuffling."""

    def __init__(self, vlm, scenes, ident: Identification | None = None, k: int = 10,
                 seed: int = 0):
        super().__init__(vlm, scenes)
        self.ident = _checked(ident, scenes)
        self.seed = W.BoundedIntText(value=seed, min=0, max=2**31 - 1, description="shuffle seed",
                                     layout=W.Layout(width="200px"))
        self.k = W.IntSlider(value=k, min=1, max=50, description="k")
        self._views: dict = {}          # (image, seed, k) → view: show() redraws what view() made
        self.picker.observe(self._render)
        for control in (self.seed, self.k):
            control.observe(self._render, names="value")

    def view(self) -> list:
        """``[captions before/after, table of retained shares per noun and method]``."""

        image = self.picker.image
        key = (self.picker.label, id(image), self.seed.value, self.k.value)
        if key not in self._views:
            self._views = {key: self._view(image)}
        return list(self._views[key])

    def _view(self, image) -> list:
        found = _of_image(self.ident, self.table_image())
        if found is None:
            found = find_neurons_by_method(self.vlm, [image], methods=("contribution",),
                                           top_k=self.k.value)
        before = found.captions[0]
        permutation = np.random.default_rng([self.seed.value, 0]).permutation(
            self.vlm.image_projector_rows)
        with permuted_image_tokens(self.vlm, permutation):
            after = self.vlm.describe([image])[0]
        frame = region_invariance(self.vlm, [image], found, top_k=self.k.value, seed=self.seed.value,
                                  methods=("contribution", "random"))
        lines = f"before shuffling: {before.text}\nafter shuffling:  {after.text}"
        if frame.empty:
            return [lines, "(the caption names no noun)"]
        table = frame.pivot_table(index="noun", columns="method", values="retained", sort=False)
        table.columns = [f"retained ({m})" for m in table.columns]
        return [lines, pd.DataFrame(table).round(3)]

    def controls(self) -> list:
        return [W.HBox([self.picker.widget()]), W.HBox([self.seed, self.k])]


def _checked(ident: Identification | None, scenes) -> Identification | None:
    """``ident``, when it is of (at least) the panel's first scenes; ``ValueError`` otherwise."""
    if ident is not None and ident.n_images < len(list(scenes)):
        raise ValueError(f"the identification holds {ident.n_images} images for {len(list(scenes))} "
                         "scenes; give the identification of these scenes (ident.subset(...))")
    return ident


def _of_image(ident: Identification | None, index: int | None) -> Identification | None:
    """The picked scene's identification (one image), or ``None`` when ``ident`` does not hold it."""
    if ident is None or index is None or index >= ident.n_images:
        return None
    return ident.subset([index])
