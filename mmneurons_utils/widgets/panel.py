"""The panels' common pattern: ``view()`` is the static output of the current state, ``show()``
displays the controls above an output area that ``view()`` refills on every change.

Under papermill there is no front end, so a notebook calls ``view()`` for the default state
(what the executed notebook stores) and ``show()`` for the live controls.
"""

from __future__ import annotations

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import display

from .pickers import ImagePicker, TokenPicker
from ..companion.outputs import compact_png


class Panel:
    """An image picker, a noun picker and an output area; subclasses add ``controls()`` and
    ``view()`` (a list of strings, DataFrames / Series and matplotlib Figures)."""

    def __init__(self, vlm, scenes, noun_description: str = "noun"):
        self.vlm = vlm
        self.picker = ImagePicker(scenes)
        self.nouns = TokenPicker(description=noun_description)
        self.out = W.Output()
        self._shown = False
        self._table_seed = self.picker.seed.value   # an identification given to a panel is of these scenes

    def table_image(self) -> int | None:
        """The picked scene's position among the panel's first scenes — its ``image`` in an
        :class:`~mmneurons_utils.method.identification.Identification` of them (``ident.table``,
        ``ident.captions[i]``) — or ``None`` (an upload, or scenes redrawn with another seed)."""
        index = self.picker.index.value
        return index if index >= 0 and self.picker.seed.value == self._table_seed else None

    def controls(self) -> list:
        """The rows of widgets shown above the output."""
        raise NotImplementedError

    def view(self) -> list:
        raise NotImplementedError

    def _render(self, *_):
        """Refill the output area through the widget's state (no kernel display messages, so
        headless runs store nothing extra); figures as compact PNGs."""
        if not self._shown:
            return
        from IPython.display import Image


        self.out.outputs = ()
        for item in self.view():
            if isinstance(item, str):
                self.out.append_stdout(item + "\n")
                continue
            if isinstance(item, plt.Figure):
                item = Image(data=compact_png(item), format="png")
            self.out.append_display_data(item)

    def show(self) -> None:
        display(W.VBox([*self.controls(), self.out]))
        self._shown = True
        self._render()
