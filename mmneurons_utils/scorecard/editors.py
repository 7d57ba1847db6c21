"""Claim 7 against the editors the field uses: ours (``contribution``, k = 5) beside the strongest
of fine-tuning, LoRA and ROME on the same source → target pairs.

It reads the editors' summary table (``TABLES["editors_summary"]``: notebook 05's last section:
:func:`~mmneurons_utils.batch.editor_comparison.summarize_editors` per model, with a ``model``
column), on the three axes EasyEdit reports for a VLM edit: ``success`` (reliability, all pairs),
``m_generality`` (held-out images of the source) and ``m_locality`` (unrelated images' tokens
unchanged); every mean with its 95 % bootstrap interval over pairs.

*Strongest* is the field editor with the highest mean of the three axes. On each axis ours is
*behind* it when ours' interval lies wholly below its interval, *ahead* when wholly above.
The rule that judges it is with the others, in :mod:`.claims`.
"""

from __future__ import annotations

import math

import pandas as pd

from ..interventions.editors import WEIGHT_EDITORS
from .evidence import EDIT_NEURONS, NAN, Evidence, Value, _fmt
from .schema import EDITOR_AXES as AXES, TABLES, require

TABLE = TABLES["editors_summary"]


def _value(row, axis: str) -> Value:
    return Value(float(row[axis]), float(row[f"{axis}_low"]), float(row[f"{axis}_high"]))


def _score(row) -> float:
    """The mean of the three axes (NaN counts as 0: an editor that never applied has no locality)."""
    return sum(0.0 if math.isnan(float(row[a])) else float(row[a]) for a in AXES) / len(AXES)


def _model_evidence(group: pd.DataFrame) -> Evidence | str:
    ours = group[(group["method"] == "contribution") & (group["k"].astype(int) == EDIT_NEURONS)]
    field = group[group["method"].isin(WEIGHT_EDITORS)]
    if ours.empty:
        return f"{TABLE.file} has no contribution row with k = {EDIT_NEURONS}"
    if field.empty:
        return f"{TABLE.file} has none of the field's editors ({', '.join(WEIGHT_EDITORS)})"
    ours = ours.iloc[0]
    best = field.loc[field.apply(_score, axis=1).idxmax()]
    random = group[group["method"] == "random"]
    axes = {a: (_value(ours, a), _value(best, a)) for a in AXES}
    detail = "; ".join(
        f"{a}: ours {_fmt(o.mean)} vs {best['method']} {_fmt(b.mean)}"
        + (" (behind)" if b.above(o) else " (ahead)" if o.above(b) else "") for a, (o, b) in axes.items())
    others = ", ".join(f"{r['method']} {_fmt(_score(r))}" for _, r in field.iterrows())
    return Evidence(
        f"edit success, m_generality, m_locality ({EDIT_NEURONS} contribution units) vs the strongest "
        "field editor", axes["success"][0],
        {"gradient": NAN, "gradient_image": NAN,
         "random": NAN if random.empty else _value(random.iloc[0], "success")},
        float(ours["n_pairs"]), extra={"axes": axes, "strongest": str(best["method"])},
        detail=f"strongest: {best['method']} (mean of the three axes: {others}, ours "
               f"{_fmt(_score(ours))}); {detail}; 95 % bootstrap intervals over pairs")


def measure_editing_vs_field(tables, notebook_model):
    frame = require(tables, TABLE.key)
    return {str(model): _model_evidence(group) for model, group in frame.groupby("model", sort=False)}
