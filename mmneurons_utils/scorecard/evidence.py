"""The measurements behind the paper-claims scorecard (:mod:`.claims` holds the rules).

Each ``_measure_*`` reads the notebooks' tables (``tables``: key → DataFrame, from
:func:`~mmneurons_utils.scorecard.schema.read_tables`; the keys, files and columns are declared
in :mod:`.schema`) for one claim and returns, per model, the :class:`Evidence` its rule
judges — ours (contribution) with its interval, the baselines, ``n`` and a detail line — or
raises :class:`Unusable` with the reason the claim cannot be measured. Which model a
single-model table (notebooks 04 and 05) is about comes from :func:`notebook_model`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ..store.notebooks import parameter_defaults
from .schema import TABLES, Unusable, read_tables, require  # noqa: F401  (read_tables: here too)

BASELINES = ("gradient", "gradient_image", "random", "selection_null")
CAUSAL_K = 200                                 # the k at which the causal claim is read
EDIT_NEURONS = 5                               # the edits' number of units
OVERHEAD_MAX, SPEEDUP_MIN = 1.15, 20.0         # the README's performance goals

class Value(NamedTuple):
    """A mean with its 95 % interval (NaN where the table has none)."""
    mean: float
    low: float = math.nan
    high: float = math.nan

    def above(self, other: "Value") -> bool:
        """Intervals separate: this one's low bound above ``other``'s high bound."""
        return bool(self.low > other.high)                 # False when either is NaN


NAN = Value(math.nan)


@dataclass
class Evidence:
    """What one claim's table says about one model: ``ours`` (contribution) and the baselines
    on ``metric``, plus ``extra`` values the rule reads and a ``detail`` line for readers."""
    metric: str
    ours: Value
    baselines: dict
    n: float = math.nan
    n_clusters: float = math.nan
    extra: dict | None = None
    detail: str = ""


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    x = float(x)
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def _fmt_value(v: Value) -> str:
    if v is None or math.isnan(v.mean):
        return "—"
    if math.isnan(v.low) or math.isnan(v.high):
        return _fmt(v.mean)
    return f"{_fmt(v.mean)} [{_fmt(v.low)}, {_fmt(v.high)}]"


def wilson_interval(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion ``successes / n`` (NaNs when ``n`` is 0)."""
    if not n or n <= 0 or math.isnan(n):
        return math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


# ---------------------------------------------------------------------------- reading

def _summary(frame: pd.DataFrame, notebook_model: str | None) -> pd.DataFrame:
    """A ``summarize_ci`` long table (checked by :func:`require`) with a ``model`` column (the
    notebook's model if absent)."""
    if "model" not in frame:
        frame = frame.assign(model=notebook_model or "(notebook's model)")
    for column in ("low", "high", "n", "n_clusters"):
        if column not in frame:
            frame = frame.assign(**{column: math.nan})
    frame = frame.copy()
    frame["model"] = frame["model"].astype(str)
    return frame


def _pick(frame: pd.DataFrame, model: str, method: str, metric: str) -> tuple[Value, float, float]:
    rows = frame[(frame["model"] == model) & (frame["method"] == method) & (frame["metric"] == metric)]
    if rows.empty:
        return NAN, math.nan, math.nan
    row = rows.iloc[0]
    return (Value(float(row["mean"]), float(row["low"]), float(row["high"])),
            float(row["n"]), float(row["n_clusters"]))


def _summary_evidence(frame, notebook_model, metric, label, extra_metrics=(), detail=None):
    """Per model: contribution and baselines on ``metric`` (+ ``extra_metrics`` per method);
    ``detail(extra)`` writes the reader's line from those values."""
    frame = _summary(frame, notebook_model)
    out = {}
    for model in dict.fromkeys(frame["model"]):
        ours, n, n_clusters = _pick(frame, model, "contribution", metric)
        if math.isnan(ours.mean):
            out[model] = f"no contribution value of {metric!r} for {model}"
            continue
        extra = {(method, m): _pick(frame, model, method, m)[0]
                 for method in ("contribution", *BASELINES) for m in (metric, *extra_metrics)}
        out[model] = Evidence(label, ours, {b: _pick(frame, model, b, metric)[0] for b in BASELINES},
                              n, n_clusters, extra, detail(extra) if detail else "")
    return out


# ---------------------------------------------------------------------------- the claims

def _measure_layers(tables, notebook_model):
    table = TABLES["layer_distribution"]
    frame = require(tables, table.key)
    if "layer" in frame:
        frame = frame.set_index("layer")
    frame = frame.drop(columns=[c for c in frame if str(c).startswith("Unnamed")])
    if len(frame) < 2:
        raise Unusable(f"{table.file} has fewer than 2 layers")
    out = {}
    for model in frame.columns:
        # each model its own depth: a 4-layer model beside a 30-layer one has empty rows below
        column = pd.to_numeric(frame[model], errors="coerce")
        column = column[column.notna()]
        n_layers = len(column)
        layers = np.asarray(column.index if frame.index.name == "layer" else range(n_layers), dtype=float)
        shares = column.to_numpy(dtype=float)
        if n_layers < 2 or shares.sum() <= 0:
            out[str(model)] = f"{table.file}: no shares for {model}"
            continue
        upper = layers >= n_layers / 2
        chance = float(upper.mean())
        share = float(shares[upper].sum() / shares.sum())
        top = int(np.argmax(shares))
        out[str(model)] = Evidence(
            "share of top-k contribution units in the upper half of layers", Value(share), {},
            extra={"chance": chance},
            detail=(f"layers {int(layers[upper][0])}–{int(layers[-1])} of {n_layers}; uniform units "
                    f"would give {_fmt(chance)}; most units in layer {int(layers[top])} "
                    f"({_fmt(shares[top] / shares.sum())})"))
    return out


def _measure_sensitivity(tables, notebook_model):
    return _summary_evidence(
        require(tables, "noun_hits"), notebook_model,
        "noun_hit", "noun hit (top-10 units' top-10 tokens contain the noun)",
        ("noun_rank", "chance", "hit_where_nameable", "noun_hit_no_hubs", "nameable"),
        lambda x: (f"chance 10 / V {_fmt(x['contribution', 'chance'].mean)}; noun rank (mean of the "
                   f"median in the units' lenses): ours {_fmt(x['contribution', 'noun_rank'].mean)}, "
                   f"selection null {_fmt(x['selection_null', 'noun_rank'].mean)}, random "
                   f"{_fmt(x['random', 'noun_rank'].mean)}; nouns some unit names (ceiling) "
                   f"{_fmt(x['contribution', 'nameable'].mean)}, hit where nameable ours "
                   f"{_fmt(x['contribution', 'hit_where_nameable'].mean)} vs null "
                   f"{_fmt(x['selection_null', 'hit_where_nameable'].mean)}; without hub tokens ours "
                   f"{_fmt(x['contribution', 'noun_hit_no_hubs'].mean)} vs null "
                   f"{_fmt(x['selection_null', 'noun_hit_no_hubs'].mean)}"))


# The map the rule reads: the median-centred one. The occlusion maps' mass in box does not separate
# noun units from random ones (painting the object out changes almost every unit only inside its box,
# so any unit's change map is local: smol-llava 0.315 contribution vs 0.315 random); their signed share
# in the box (does removing the object lower the units in the direction they write the noun?) is
# reported beside it.
MAP_METRICS = (("mass_in_box_centred", "median-centred maps: p·a minus its median over the patches"),)


def _map_metric(frame: pd.DataFrame, model: str) -> tuple[str, str] | None:
    """The map the specificity rule reads for ``model``: occlusion where measured, else centred."""
    for metric, label in MAP_METRICS:
        if not math.isnan(_pick(frame, model, "contribution", metric)[0].mean):
            return metric, label
    return None


def _measure_specificity(tables, notebook_model):
    frame = _summary(require(tables, "specificity"), notebook_model)
    out = {}
    for model in dict.fromkeys(frame["model"]):
        auroc, n, n_clusters = _pick(frame, model, "contribution", "auroc")
        chosen = _map_metric(frame, model)
        if chosen is not None:
            metric, label = chosen
            extra = {(m, name): _pick(frame, model, m, name)[0] for m in ("contribution", *BASELINES)
                     for name in (metric, "mass_in_box", "box_share", "auroc", "occlusion_signed_in_box")}
            extra.update({(m, "map_metric"): extra[m, metric] for m in ("contribution", *BASELINES)})
            ours, n, n_clusters = _pick(frame, model, "contribution", metric)
            box = extra["contribution", "box_share"]
            out[model] = Evidence(
                f"mass in box of the {label.split(':')[0]}", ours,
                {b: extra[b, metric] for b in BASELINES}, n, n_clusters, extra,
                f"{label}; box share (chance) {_fmt(box.mean)}; raw maps' mass in box ours "
                f"{_fmt_value(extra['contribution', 'mass_in_box'])}, random "
                f"{_fmt(extra['random', 'mass_in_box'].mean)}; occlusion maps' signed share in the box "
                f"(chance 0) ours {_fmt_value(extra['contribution', 'occlusion_signed_in_box'])}, random "
                f"{_fmt(extra['random', 'occlusion_signed_in_box'].mean)}, selection null "
                f"{_fmt(extra['selection_null', 'occlusion_signed_in_box'].mean)}; selectivity AUROC ours "
                f"{_fmt_value(auroc)}, random {_fmt_value(extra['random', 'auroc'])}")
            continue
        mass, n, n_clusters = _pick(frame, model, "contribution", "mass_in_box")
        if not math.isnan(mass.mean):
            out[model] = (f"{TABLES['specificity'].file} has only the raw maps' mass in box (a flat offset "
                          "on a pretrained LM); rerun notebook 02 for the median-centred maps")
            continue
        if not math.isnan(auroc.mean):      # no patch grid (InstructBLIP): AUROC alone
            extra = {(m, "auroc"): _pick(frame, model, m, "auroc")[0] for m in ("contribution", *BASELINES)}
            out[model] = Evidence(
                "selectivity AUROC (mass in box undefined: no patch grid)", auroc,
                {b: extra[b, "auroc"] for b in BASELINES}, n, n_clusters, extra,
                "mass in box is not defined for this model (its image tokens are not patches)")
    return out


def _measure_region(tables, notebook_model):
    return _summary_evidence(
        require(tables, "region"), notebook_model, "retained",
        "retained: share of the top-10 still top-10 after shuffling the image tokens (single-noun scenes)",
        ("noun_kept", "caption_same"),
        lambda x: (f"noun still said after the shuffle {_fmt(x['contribution', 'noun_kept'].mean)}; "
                   f"caption unchanged {_fmt(x['contribution', 'caption_same'].mean)}"))


def _measure_cross(tables, notebook_model):
    return _summary_evidence(
        require(tables, "cross_image"), notebook_model, "jaccard_same",
        "Jaccard of one noun's top-10 sets across its images", ("jaccard_different", "top_unit_share"),
        lambda x: (f"vs other nouns' sets {_fmt_value(x['contribution', 'jaccard_different'])}; "
                   f"scenes holding the noun's most frequent unit {_fmt(x['contribution', 'top_unit_share'].mean)}"))


def _measure_causal(tables, notebook_model):
    table = TABLES["causal_curves"]
    frame = require(tables, table.key)
    mode = "all"
    if "perturbation" in frame:
        modes = list(dict.fromkeys(frame["perturbation"]))
        mode = "zero" if "zero" in modes else modes[0]
        frame = frame[frame["perturbation"] == mode]
    ours = frame[frame["method"] == "contribution"]
    if ours.empty:
        raise Unusable(f"{table.file} has no contribution rows")
    ks = sorted(ours["k"].astype(int).unique())
    k = max([x for x in ks if x <= CAUSAL_K], default=ks[0])
    at = frame[frame["k"].astype(int) == k].groupby("method")[["margin_drop", "noun_removed"]].mean()
    n = float(ours.loc[ours["k"].astype(int) == k, "n"].iloc[0]) if "n" in ours else math.nan
    get = lambda method, col: Value(float(at.loc[method, col])) if method in at.index else NAN
    removed = {m: get(m, "noun_removed") for m in ("contribution", *BASELINES)}
    e = Evidence(f"margin drop of the noun (logits) at k = {k}, {mode}", get("contribution", "margin_drop"),
                 {b: get(b, "margin_drop") for b in BASELINES}, n,
                 extra={"removed": removed, "k": k},
                 detail=("noun removed from the caption: " + ", ".join(
                     f"{m} {_fmt(v.mean)}" for m, v in removed.items() if not math.isnan(v.mean))
                     + f"; {int(n) if not math.isnan(n) else '?'} nouns, no interval in the table"))
    return {notebook_model: e}


def _measure_editing(tables, notebook_model):
    table = TABLES["edit_summary"]
    frame = require(tables, table.key)
    rows = {}
    for units in ("contribution", *BASELINES):
        match = frame[(frame["units"] == units) & (frame["n_neurons"].astype(int) == EDIT_NEURONS)]
        rows[units] = None if match.empty else match.iloc[0]
    if rows["contribution"] is None:
        raise Unusable(f"{table.file} has no contribution row with n_neurons = {EDIT_NEURONS}")

    def success(row) -> Value:
        if row is None:
            return NAN
        low, high = wilson_interval(float(row["success"]) * float(row["n_pairs"]), float(row["n_pairs"]))
        return Value(float(row["success"]), low, high)

    ours = rows["contribution"]
    locality = {u: (math.nan if r is None else float(r["locality"])) for u, r in rows.items()}
    applied = "" if "n_applied" not in frame else f"{int(ours['n_applied'])} / {int(ours['n_pairs'])} applied; "
    e = Evidence(f"edit success over source → target pairs ({EDIT_NEURONS} units; Wilson 95 % interval)",
                 success(ours), {b: success(rows[b]) for b in BASELINES}, float(ours["n_pairs"]),
                 extra={"locality": locality},
                 detail=(applied + "locality (captions unchanged on unrelated images, applied edits): "
                         + ", ".join(f"{u} {_fmt(v)}" for u, v in locality.items() if rows[u] is not None)))
    return {notebook_model: e}


def _measure_speed(tables, notebook_model):
    frame = require(tables, "speed")
    frame = frame.set_index(frame.columns[0])
    get = lambda model, name: float(frame.loc[name, model]) if name in frame.index else math.nan
    out = {}
    for model in frame.columns:
        ratio, speedup = get(model, "overhead_ratio"), get(model, "gradient_speedup")
        image = get(model, "gradient_image_speedup")
        out[str(model)] = Evidence(
            "ms per noun to score after the shared generation (verdict: overhead_ratio, gradient_speedup)",
            Value(get(model, "contribution_ms_per_noun")),
            {"gradient": Value(get(model, "gradient_ms_per_noun")),
             "gradient_image": Value(get(model, "gradient_image_ms_per_noun")), "random": NAN},
            get(model, "n_nouns"), extra={"overhead_ratio": ratio, "gradient_speedup": speedup},
            detail=(f"overhead_ratio {_fmt(ratio)} (find ÷ caption; goal ≤ {OVERHEAD_MAX}); "
                    f"gradient_speedup {_fmt(speedup)} (goal ≥ {SPEEDUP_MIN:g})"
                    + ("" if math.isnan(image) else f"; gradient_image_speedup {_fmt(image)}")
                    + "; each a ratio of the least time of each side over "
                    + ("" if math.isnan(get(model, "repeats")) else f"{int(get(model, 'repeats'))} ")
                    + "interleaved runs in one call (A B A B …), so load cancels; the absolute "
                    "times (ms per noun) are this machine's"))
    return out


# ---------------------------------------------------------------------------- the card

def _executed_model(tables_dir: Path, prefix: str) -> str | None:
    """``model`` of the executed ``<out>/notebooks/<prefix>_*.ipynb``: papermill's parameters
    when the run gave one, else the default in its ``parameters`` cell."""
    for path in sorted((tables_dir.parent / "notebooks").glob(f"{prefix}_*.ipynb")):
        try:
            notebook = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        model = notebook.get("metadata", {}).get("papermill", {}).get("parameters", {}).get("model")
        if model:
            return str(model)
        try:
            model = parameter_defaults(notebook).get("model")
        except SyntaxError:
            continue
        if isinstance(model, str) and model:
            return model
    return None


def notebook_model(tables_dir: Path, tables: dict, prefix: str, fallback: str | None) -> str | None:
    """The model notebook ``prefix`` ran on: papermill's parameters of its executed copy, else the
    first model column of the model summary / speed table (a run gives every notebook the same
    model), else ``fallback``."""
    model = _executed_model(tables_dir, prefix)
    if model:
        return model
    for key in ("model_summary", "speed"):
        frame = tables.get(key)
        if frame is not None and len(frame.columns) >= 2:
            return str(frame.columns[1])
    return fallback


