"""The ablation panel: image, noun, ``k`` and σ → the caption and the noun's margin, live.

The noun's top-``k`` contribution units (from a ``find_neurons`` table when one is given, and, for comparison, ``k`` seeded random units)
are perturbed inside a ``with`` block (zeroed, or Gaussian noise of σ × the column's RMS
when σ > 0); the weights are restored after each render. One render is two teacher-forced
forwards and two greedy captions (≈ 0.1 s on the embedded models).
"""

from __future__ import annotations

import ipywidgets as W
import pandas as pd

from ..interventions.causal import margin_and_prob, measure_condition, perturbation_context, rankings
from ..method.identification import units_of
from ..model.teacher_forcing import teacher_forced_logits
from .panel import Panel


class AblationPanel(Panel):
    """Pick an image and a noun of its caption; slide ``k`` and σ (0 = zero the columns)."""

    def __init__(self, vlm, scenes, k: int = 50, sigma: float = 0.0, seed: int = 0, max_k: int = 500,
                 table=None):
        super().__init__(vlm, scenes)
        self.seed = seed
        # a find_neurons table of these scenes: its units are the ones perturbed (k ≤ its top_k)
        self.table = table
        if table is not None:
            max_k = min(max_k, int(table["rank"].max()) + 1)
        self.k = W.IntSlider(value=min(k, max_k), min=1, max=min(max_k, vlm.n_layers * vlm.d_ff),
                             description="k",
                             continuous_update=False)
        self.sigma = W.FloatSlider(value=sigma, min=0.0, max=5.0, step=0.25, description="σ (0=zero)",
                                   continuous_update=False)
        self._ranks: dict = {}
        self.picker.observe(lambda _: self._image_changed())
        self.nouns.observe(lambda _: self._render())
        for control in (self.k, self.sigma):
            control.observe(lambda _: self._render(), names="value")
        self._image_changed()

    def _image_changed(self):
        image = self.picker.image
        self.caption = self.vlm.describe([image], activation="down_proj_input")[0]
        ranks = rankings(self.vlm, [image], [self.caption], ("contribution", "random"),
                         self.k.max, 1, self.seed)
        self._ranks = {r["target"].noun: (r["target"], r["ranks"]) for r in ranks}
        index = self.table_image()
        if self.table is not None and index is not None:  # the table's units replace the ranking
            for noun, (target, ranked) in self._ranks.items():
                ranked["contribution"] = [units_of(self.table, noun, self.k.max, image=index)]
        self.nouns.set_caption(self.caption)  # fires the noun observer → render

    def view(self) -> list:
        """``[summary line, table]``: per unit set, the caption and the noun's margin/probability."""
        noun = self.nouns.value
        if noun is None:
            return [f"caption: {self.caption.text!r} names no noun; pick another image"]
        target, ranks = self._ranks[noun]
        k, sigma = self.k.value, (self.sigma.value or None)
        image = self.picker.image
        clean = teacher_forced_logits(self.vlm, [image], [self.caption.token_ids])[0][target.step]
        margin, prob = margin_and_prob(clean, target.token_id)
        rows = [dict(units="none (clean)", caption=self.caption.text, margin=margin, prob=prob,
                     noun_said=True)]
        for name, method in ((f"top-{k} contribution", "contribution"), (f"{k} random", "random")):
            context = perturbation_context(self.vlm, ranks[method][0][:k], sigma, seed=self.seed)
            after = measure_condition(self.vlm, image, self.caption, target, context)
            rows.append(dict(units=name, caption=after["caption"], margin=after["margin"],
                             prob=after["prob"], noun_said=not after["removed"]))
        how = "zeroed" if sigma is None else f"noise σ={sigma:g}"
        line = f"noun: {noun} (step {target.step}) | {k} units {how}"
        return [line, pd.DataFrame(rows).round(3)]

    def controls(self) -> list:
        return [self.picker.widget(), self.nouns.widget(), W.HBox([self.k, self.sigma])]
