"""The ablation panel: image, noun, ``k`` and σ → the caption and the noun's margin, live.

The noun's top-``k`` units of an :class:`~mmneurons_utils.method.identification.Identification`
(its contribution units and, for comparison, its ``k`` random units) are perturbed — zeroed, or
Gaussian noise of σ × the column's RMS when σ > 0 — through the causal code's batched path
(:func:`~mmneurons_utils.interventions.causal.measure_conditions`: both unit sets in one batch,
per-row hooks, the weights never written). One render is a teacher-forced forward of the clean
caption, one of the two conditions and one batched greedy generation.
"""

from __future__ import annotations

import ipywidgets as W
import pandas as pd

from ..interventions.ablation import RowPerturbation
from ..interventions.causal import margin_and_prob, measure_conditions, rankings
from ..method.identification import Identification, units_of
from ..model.teacher_forcing import teacher_forced_logits
from .panel import Panel

UNIT_SETS = ("contribution", "random")


class AblationPanel(Panel):
    """Pick an image and a noun of its caption; slide ``k`` (up to the identification's
    ``top_k``) and σ (0 = zero the columns).

    ``ident``: the identification of ``scenes`` (its captions and units are used; nothing is
    identified again). An image that is not one of them (an upload, scenes drawn with another
    seed) is captioned and ranked on the spot (random units seeded by ``seed``).
    """

    def __init__(self, vlm, scenes, ident: Identification, k: int = 50, sigma: float = 0.0,
                 seed: int = 0):
        if not isinstance(ident, Identification):
            raise TypeError(f"AblationPanel takes the scenes' Identification, got {type(ident).__name__}")
        ident.check_made_on(scenes, "scenes")
        missing = [m for m in UNIT_SETS if m not in set(ident.table["method"])]
        if missing:
            raise ValueError(f"the identification has no {', '.join(missing)} units; identify with "
                             f"methods including {', '.join(UNIT_SETS)}")
        super().__init__(vlm, scenes)
        self.ident, self.seed = ident, seed
        self.max_new_tokens = int(ident.settings.get("max_new_tokens", 20))
        max_k = ident.top_k
        self.k = W.IntSlider(value=min(k, max_k), min=1, max=max_k, description="k",
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
        image, index = self.picker.image, self.table_image()
        if index is not None:              # one of the identification's images: its caption and units
            self.caption = self.ident.captions[index]
            self._ranks = {t.noun: (t, {m: units_of(self.ident.table, t.noun, self.k.max, image=index,
                                                    method=m) for m in UNIT_SETS})
                           for t in self.caption.noun_tokens}
        else:
            self.caption = self.vlm.describe([image], max_new_tokens=self.max_new_tokens,
                                             activation="down_proj_input")[0]
            ranks = rankings(self.vlm, [image], [self.caption], UNIT_SETS, self.k.max, 1, self.seed)
            self._ranks = {r["target"].noun: (r["target"], {m: r["ranks"][m][0] for m in UNIT_SETS})
                           for r in ranks}
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
        conditions = [(target, RowPerturbation(ranks[m][:k], "zero") if sigma is None else
                       RowPerturbation(ranks[m][:k], "noise", sigma=sigma, seed=self.seed))
                      for m in UNIT_SETS]
        after = measure_conditions(self.vlm, image, self.caption, conditions,
                                   max_new_tokens=self.max_new_tokens)
        for name, result in zip((f"top-{k} contribution", f"{k} random"), after):
            rows.append(dict(units=name, caption=result["caption"], margin=result["margin"],
                             prob=result["prob"], noun_said=not result["removed"]))
        how = "zeroed" if sigma is None else f"noise σ={sigma:g}"
        line = f"noun: {noun} (step {target.step}) | {k} units {how}"
        return [line, pd.DataFrame(rows).round(3)]

    def controls(self) -> list:
        return [self.picker.widget(), self.nouns.widget(), W.HBox([self.k, self.sigma])]
