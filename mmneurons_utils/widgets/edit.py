"""The edit playground: image, source noun, target noun → edit, see the new caption and the
side effects, undo.

Edit learns deltas on the source's top write vectors for the picked image (a few seconds
on the embedded models; a status line says so), keeping the captions of ``unrelated``
images in the loss; the side-effect report compares the captions of ``locality`` images
(none says the source) before and after. A failed edit is not applied, so its report says
"not applied" where the side effects would be (the unchanged model's "nothing moved" would
say nothing about the edit). Undo restores the weights bit-for-bit, and the view says so: it
reads the edit's weight state live (``edit.applied``), its outcome from ``edit.report``.

Given an :class:`~mmneurons_utils.method.identification.Identification` of the panel's scenes
(``ident=``), a picked scene of it is edited on the identification's units for the source and
its caption is the identification's (not captioned again).
"""

from __future__ import annotations

import ipywidgets as W
import pandas as pd

from .panel import Panel
from ..model.nouns import says
from ..method.identification import Identification
from ..interventions.editing import EditConfig, edit_token, evaluate_edit


class EditPlayground(Panel):
    """Pick an image, a source noun of its caption and a target noun; press edit / undo.

    ``settings``: :class:`~mmneurons_utils.interventions.edit_learning.EditConfig` fields for
    every edit (``steps=``, ``lr=``, …). The same request twice is learned once (the edit cache)."""

    def __init__(self, vlm, scenes, others=(), target: str = "cat", k: int = 5,
                 n_unrelated: int = 4, seed: int = 0, ident: Identification | None = None,
                 **settings):
        super().__init__(vlm, scenes, noun_description="source")
        self.k, self.seed = k, seed
        EditConfig.of(None, **settings)     # an unknown setting: EditInputError naming the known ones
        self.settings = settings            # EditConfig fields for every edit (steps=, lr=, …)
        # the identification of these scenes: edit its units for the picked scene and noun
        self.ident = ident
        self.others = list(others)          # images for the loss (unrelated) and the report
        self.n_unrelated = n_unrelated
        vocabulary = sorted(vlm.noun_vocabulary) if vlm.noun_vocabulary else [target]
        self.target = W.Dropdown(options=vocabulary, value=target,
                                 description="target", layout=W.Layout(width="220px"))
        self.neurons = W.IntSlider(value=k, min=1, max=50, description="neurons")
        self.edit_button = W.Button(description="edit", button_style="warning")
        self.undo_button = W.Button(description="undo", disabled=True)
        self.status = W.Label("")
        self.edit = None
        self.picker.observe(lambda _: self._image_changed())
        self.edit_button.on_click(lambda _: self.run_edit())
        self.undo_button.on_click(lambda _: self.undo())
        self._image_changed()

    def _image_changed(self):
        self.undo()
        index = self._ident_image()
        self.caption = (self.ident.captions[index] if index is not None
                        else self.vlm.describe([self.picker.image])[0])
        self.nouns.set_caption(self.caption)

    def _ident_image(self) -> int | None:
        """The picked scene's position in the identification (``None``: not in it)."""
        index = self.table_image()
        if self.ident is None or index is None or index >= self.ident.n_images:
            return None
        return index

    def _others(self, source: str) -> tuple[list, list]:
        captions = self.vlm.describe(self.others) if self.others else []
        free = [im for im, c in zip(self.others, captions) if not says(c.text, source)]
        return free[:self.n_unrelated], free[self.n_unrelated:]

    def _table_units(self, source: str):
        """The identification's top units for the picked scene's ``source`` (``None``: choose
        them here)."""
        index = self._ident_image()
        if index is None:
            return None
        return self.ident.units(source, self.neurons.value, image=index)

    def run_edit(self):
        """Edit the picked image's ``source`` into ``target`` (undoing any previous edit)."""

        self.undo()
        source, target = self.nouns.value, self.target.value
        self.status.value = f"editing {source} → {target} …"
        try:
            unrelated, locality = self._others(source)
            units = self._table_units(source)
            self.edit = edit_token(self.vlm, [self.picker.image], source, target,
                                   units=units, k=self.neurons.value,
                                   unrelated=unrelated, seed=self.seed,
                                   captions=[self.caption] if units is not None else None,
                                   **self.settings)
            if self.edit.report.accepted:
                evaluate_edit(self.edit, (), locality)
            self.status.value = ("done" if self.edit.converged else
                                 f"did not converge (final margin {self.edit.final_margin:.2f}); "
                                 "weights left unchanged")
        except ValueError as exc:  # bad source/target: say so, keep the model as it was
            self.edit = None
            self.status.value = f"error: {exc}"
        self.undo_button.disabled = self.edit is None or not self.edit.applied
        self._render()
        return self.edit

    def undo(self):
        if self.edit is not None and self.edit.applied:
            self.edit.undo()
            self.status.value = "undone: original weights restored"
            self.undo_button.disabled = True
            self._render()

    def view(self) -> list:
        """``[caption line, report table]`` for the current state (before any edit: the caption)."""
        if self.edit is None:
            return [f"caption: {self.caption.text} | source: {self.nouns.value} | "
                    f"target: {self.target.value} (press edit)"]
        e, m = self.edit, self.edit.metrics
        state = "applied" if e.applied else "undone" if e.report.accepted else "not applied"
        line = (f"{e.source} → {e.target} ({state}) | before: {e.captions_before[0]} | "
                f"after: {e.captions_after[0]}")

        def side(key, digits):  # side effects exist only for an edit put in the weights and measured
            return round(m.get(key, float("nan")), digits) if e.report.accepted else "not applied"

        report = pd.Series({"converged": m["converged"], "applied": e.applied,
                            "steps": m["steps"],
                            "final margin": round(m["final_margin"], 3), "neurons": m["n_neurons"],
                            "units (layer, unit)": ", ".join(f"{l}:{u}" for l, u in e.units),
                            "‖Δ‖ (weight change)": side("weight_norm", 3),
                            "‖Δ‖ / ‖W_out cols‖": side("relative_norm", 3),
                            "other captions unchanged": side("locality", 3),
                            "KL on other images (nats)": side("locality_kl", 4)},
                           name="side-effect report").to_frame()
        return [line, report]

    def controls(self) -> list:
        return [self.picker.widget(), self.nouns.widget(), W.HBox([self.target, self.neurons]),
                W.HBox([self.edit_button, self.undo_button, self.status])]
