"""The neuron explorer: pick a scene and a noun, see the caption and its top neurons."""

from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import display


class NeuronExplorer:
    """Pick a scene and one of its caption's nouns; see the caption and its top neurons."""

    def __init__(self, vlm, scenes, top_k: int = 10):
        from ..identify import find_neurons

        self.vlm, self.scenes, self.top_k = vlm, scenes, top_k
        self._find = find_neurons
        self.image = W.Dropdown(options=[(f"{i}: {s.caption}", i) for i, s in enumerate(scenes)],
                                description="image", layout=W.Layout(width="520px"))
        captions = vlm.describe([s.image for s in scenes])
        # start on the first scene whose caption names something
        self.image.value = next((i for i, c in enumerate(captions) if c.nouns), 0)
        self.noun = W.Dropdown(description="noun")
        self.out = W.Output()
        self.image.observe(lambda _: self._image_changed(), names="value")
        self.noun.observe(lambda _: self._render(), names="value")
        self._table = None
        self._shown = False  # render into the Output widget only once it is on screen

    def _image_changed(self):
        self._table = self._find(self.vlm, self.scenes[self.image.value].image, top_k=self.top_k)
        nouns = list(dict.fromkeys(self._table.noun))
        shown, self._shown = self._shown, False  # no half-updated renders while options change
        self.noun.options = nouns
        self.noun.value = nouns[0] if nouns else None
        self._shown = shown
        self._render()

    def view(self):
        """``(caption, table of the chosen noun's top units, figure)`` for the current choice."""
        from .. import plots

        if self._table is None:
            self._image_changed()
        caption = self._table.attrs["captions"][0]
        rows = self._table[self._table.noun == self.noun.value]
        fig = plots.neuron_bars(self._table, self.noun.value) if len(rows) else None
        return caption, rows[["rank", "layer", "unit", "score", "top_tokens"]], fig

    def _render(self):
        if not self._shown:
            return
        self.out.clear_output(wait=True)
        with self.out:
            caption, rows, fig = self.view()
            print("caption:", caption)
            display(rows)
            if fig is not None:
                plt.show(fig)

    def show(self):
        display(W.VBox([W.HBox([self.image, self.noun]), self.out]))
        self._shown = True
        self._render()
