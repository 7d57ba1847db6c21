"""Metrics over identified neurons (each a function of an :class:`~mmneurons_utils.method.
identification.Identification`, a summary table or score maps).

The property metrics live one concern a module and are re-exported here:
:mod:`~mmneurons_utils.properties.sensitivity` (semantic sensitivity),
:mod:`~mmneurons_utils.properties.specificity` (heatmaps, masks, mass in box, pointing, AUROC) and
:mod:`~mmneurons_utils.properties.invariance` (region and cross-image invariance). This module
adds the summaries: means with bootstrap intervals and the paper-style table.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .invariance import cross_image_invariance, region_invariance
from ..method.scoring import rank_correlation, top_overlap, unit_logit_lens
from .nameability import method_comparison, noun_hit_table, per_layer
from .sensitivity import TextSimilarity, noun_hits, semantic_sensitivity
from . import specificity as _specificity
from ..method.identify import find_neurons
from ..method.identification import Identification
from .stats import bootstrap_ci, cluster_bootstrap_ci, of_methods



def specificity_scores(vlm, scenes, ident: Identification, *table_and_k, **settings) -> pd.DataFrame:
    """:func:`~mmneurons_utils.properties.specificity.specificity_scores` (``ident``: the
    scenes' :class:`Identification`). DESIGN.md's earlier call form, ``(vlm, scenes, captions,
    table, k)``, is still taken at this door: the captions and table are wrapped into one
    Identification here, so the property itself only ever sees an Identification."""
    if table_and_k and isinstance(table_and_k[0], pd.DataFrame) and not isinstance(ident, Identification):
        table, *rest = table_and_k
        ident = Identification(table, list(ident), [f"image-{i}" for i in range(len(ident))])
        table_and_k = tuple(rest)
    return _specificity.specificity_scores(vlm, scenes, ident, *table_and_k, **settings)


__all__ = [
    "TextSimilarity", "noun_hits", "semantic_sensitivity", "specificity_scores",   # re-exported
    "method_comparison", "noun_hit_table", "per_layer",
    "cross_image_invariance", "region_invariance", "rank_correlation", "top_overlap",
    "depth_summary", "layer_distribution", "method_agreement", "paper_table",
    "polarity_report", "summarize",
    "summarize_ci",
]


def layer_distribution(ident: Identification, n_layers: int, method: str = "contribution",
                       k: int | None = None) -> pd.Series:
    """Share of ``method``'s top-``k`` units of ``ident`` (over images and nouns; default: all
    it holds) that sit in each layer."""
    table = of_methods(ident.table, (method,))
    if k is not None:
        table = table[table["rank"] < k]
    counts = table["layer"].value_counts().reindex(range(n_layers), fill_value=0)
    return counts / counts.sum()


def depth_summary(share: pd.Series) -> dict:
    """Where a :func:`layer_distribution` sits, comparable across depths: ``layers`` (``L``),
    ``upper_half`` (share in layers ``l ≥ L / 2``, the scorecard's rule) and ``mean_depth``
    (mean of ``(l + 1) / L``: 1 = all in the last layer)."""
    n = len(share)
    layers = np.arange(n)
    return dict(layers=n, upper_half=float(share[layers >= n / 2].sum()),
                mean_depth=float((share.to_numpy() * (layers + 1)).sum() / n))


def method_agreement(maps: list[dict], ks: Sequence[int] = (10, 50), seed: int = 0) -> pd.DataFrame:
    """Contribution vs each other scoring method of ``score_maps`` (and vs random units),
    for each (image, noun).

    Columns: ``k``, per other method ``m`` (e.g. ``gradient``, ``gradient_image``):
    ``overlap_<m>`` (share of the contribution top-k also in ``m``'s top-k) and
    ``spearman_<m>`` (rank correlation over all units); ``overlap_random`` (against a
    random score map: the chance level ≈ k / units).
    """
    rng = torch.Generator().manual_seed(seed)
    rows = []
    for entry in maps:
        ours = entry["contribution"]
        others = {m: v for m, v in entry.items() if isinstance(v, torch.Tensor) and m != "contribution"}
        noise = torch.rand(ours.shape, generator=rng)
        rho = {f"spearman_{m}": rank_correlation(ours, v) for m, v in others.items()}
        for k in ks:
            rows.append(dict(image=entry["image"], noun=entry["noun"], k=k,
                             **{f"overlap_{m}": top_overlap(ours, v, k) for m, v in others.items()},
                             overlap_random=top_overlap(ours, noise, k), **rho))
    return pd.DataFrame(rows)


def polarity_report(vlm, images, ident: Identification, top_k: int = 10,
                    n_top_tokens: int = 10) -> dict:
    """Why a unit's coefficient has a sign, measured on ``images``.

    The paper's units are ranked by ``a · (W_U[t] · W_out[:, i])`` with ``a`` the input of
    ``down_proj`` (SwiGLU: ``act(gate)·up``, either sign). The official code records
    ``act(gate)`` alone, which is (almost) never negative, so its ranking cannot show
    units that write the noun through ``−W_out``. ``ident``: the :class:`Identification` of
    ``images`` (its ``contribution`` rows, ``top_k`` ≤ its own); only the official tensor's
    ranking is computed here (``act(gate)`` is another activation, so another identification).
    Returns, over every noun's top-``top_k`` contribution units: ``units``,
    ``negative_coefficient`` (share with ``a < 0``: polarity −1), ``negative_gate_only`` (the
    same share when ``a`` is read as ``act(gate)``, the official tensor), ``noun_hit_signed`` /
    ``noun_hit_unsigned`` (share of units whose top-``n_top_tokens`` tokens contain the noun,
    read with and without the polarity).
    """

    images = list(images)
    ident.check_made_on(images)
    table = of_methods(ident.table, ("contribution",))
    if len(table) and int(table["rank"].max()) + 1 < top_k:
        raise ValueError(f"top_k={top_k} but the identification holds the top "
                         f"{int(table['rank'].max()) + 1} units per noun")
    exact = table[table["rank"] < top_k]
    gate = find_neurons(vlm, images, top_k=top_k, n_top_tokens=n_top_tokens, activation="act_fn",
                        max_new_tokens=ident.settings.get("max_new_tokens", 20))
    _, unsigned = unit_logit_lens(vlm, exact[["layer", "unit"]].to_numpy(), n_top_tokens,
                                  token_ids=exact.token_id.to_numpy())
    return dict(units=len(exact), negative_coefficient=float((exact.polarity < 0).mean()),
                negative_gate_only=float((gate.polarity < 0).mean()),
                noun_hit_signed=float((exact.noun_rank < n_top_tokens).mean()),
                noun_hit_unsigned=float((unsigned < n_top_tokens).mean()))


def summarize(frame: pd.DataFrame, by: str, columns: Sequence[str]) -> pd.DataFrame:
    """Mean of ``columns`` grouped by ``by``, rounded for display."""
    return frame.groupby(by)[list(columns)].mean().round(3)


def summarize_ci(frame: pd.DataFrame, by: Sequence[str], metrics: Sequence[str],
                 seed: int = 0, n_resamples: int = 2000,
                 cluster: str | None = "image") -> pd.DataFrame:
    """Long table: one row per group of ``by`` and metric, with ``mean, low, high, n,
    n_clusters`` (the mean and its percentile-bootstrap 95 % interval, NaNs dropped; a
    metric missing from ``frame``, e.g. BLEURT when not computed, gets NaNs and ``n = 0``).

    When ``frame`` has a ``cluster`` column (default ``image``) the bootstrap resamples its
    values, not rows (:func:`~mmneurons_utils.properties.stats.cluster_bootstrap_ci`): the (image,
    noun) rows of one image are not independent. ``cluster=None`` or no such column
    resamples rows, and ``n_clusters`` is ``n``."""

    clustered = cluster is not None and cluster in frame
    rows = []
    for key, group in frame.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            values = group[metric].astype(float) if metric in group else pd.Series([], dtype=float)
            n = int(values.notna().sum())
            if clustered:
                ids = group[cluster] if metric in group else pd.Series([], dtype=object)
                mean, low, high = cluster_bootstrap_ci(values, ids, n_resamples=n_resamples,
                                                       seed=seed)
                n_clusters = int(ids[values.notna()].nunique())
            else:
                mean, low, high = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
                n_clusters = n
            rows.append(dict(zip(by, key), metric=metric, mean=mean, low=low, high=high,
                             n=n, n_clusters=n_clusters))
    return pd.DataFrame(rows, columns=[*by, "metric", "mean", "low", "high", "n", "n_clusters"])


def paper_table(summary: pd.DataFrame, index: Sequence[str] = ("model", "method"),
                digits: int = 3) -> pd.DataFrame:
    """Wide display table: rows ``index``, a column per metric, cells ``"mean [low, high]"``
    (``"not computed"`` where a group has no value)."""
    cell = lambda r: ("not computed" if pd.isna(r["mean"]) else
                      f"{r['mean']:.{digits}f} [{r['low']:.{digits}f}, {r['high']:.{digits}f}]")
    shown = summary.assign(cell=summary.apply(cell, axis=1))
    wide = shown.pivot_table(index=list(index), columns="metric", values="cell", aggfunc="first",
                             sort=False)
    wide.columns.name = None
    return wide.fillna("not computed")
