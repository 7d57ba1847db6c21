"""Metrics over identified neurons (each a plain function of tables or score maps).

The property metrics live one concern a module and are re-exported here:
:mod:`~mmneurons_utils.sensitivity` (semantic sensitivity),
:mod:`~mmneurons_utils.specificity` (heatmaps, masks, mass in box, pointing, AUROC) and
:mod:`~mmneurons_utils.invariance` (region and cross-image invariance). This module
adds the summaries: means with bootstrap intervals and the paper-style table.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .invariance import cross_image_invariance, region_invariance
from .scoring import rank_correlation, top_overlap
from .sensitivity import TextSimilarity, noun_hits, semantic_sensitivity
from .specificity import specificity_scores

__all__ = [
    "TextSimilarity", "noun_hits", "semantic_sensitivity", "specificity_scores",   # re-exported
    "cross_image_invariance", "region_invariance", "rank_correlation", "top_overlap",
    "layer_distribution", "method_agreement", "noun_in_top_tokens", "paper_table", "summarise",
    "summarise_ci",
]


def layer_distribution(table: pd.DataFrame, n_layers: int) -> pd.Series:
    """Share of all top-k units (over images and nouns) that sit in each layer."""
    counts = table["layer"].value_counts().reindex(range(n_layers), fill_value=0)
    return counts / counts.sum()


def method_agreement(maps: list[dict], ks: Sequence[int] = (10, 50), seed: int = 0) -> pd.DataFrame:
    """Contribution vs gradient (and vs random units) for each (image, noun) of ``score_maps``.

    Columns: ``k``, ``overlap_gradient`` (share of the contribution top-k also in the
    gradient top-k), ``overlap_random`` (same against a random score map, the chance
    level ≈ k / units), ``spearman`` (rank correlation over all units).
    """
    rng = torch.Generator().manual_seed(seed)
    rows = []
    for entry in maps:
        ours, grad = entry["contribution"], entry["gradient"]
        noise = torch.rand(ours.shape, generator=rng)
        rho = rank_correlation(ours, grad)
        for k in ks:
            rows.append(dict(image=entry["image"], noun=entry["noun"], k=k,
                             overlap_gradient=top_overlap(ours, grad, k),
                             overlap_random=top_overlap(ours, noise, k), spearman=rho))
    return pd.DataFrame(rows)


def summarise(frame: pd.DataFrame, by: str, columns: Sequence[str]) -> pd.DataFrame:
    """Mean of ``columns`` grouped by ``by``, rounded for display."""
    return frame.groupby(by)[list(columns)].mean().round(3)


def noun_in_top_tokens(table: pd.DataFrame) -> float:
    """Share of (noun, neuron) rows whose top tokens name the noun (NaN if no rows).

    Tokens are read in each unit's polarity (a ``find_neurons`` table's ``top_tokens``);
    the match uses ``noun_rank`` when the table has it, else the marker-stripped words
    (``▁dog`` / ``Ġdog`` match ``dog``). See :func:`~mmneurons_utils.sensitivity.noun_hits`.
    """
    from .sensitivity import unit_names_noun

    if not len(table):
        return float("nan")
    ranks = table["noun_rank"] if "noun_rank" in table else [None] * len(table)
    return float(np.mean([unit_names_noun(noun, tokens, rank)
                          for noun, tokens, rank in zip(table.noun, table.top_tokens, ranks)]))


def summarise_ci(frame: pd.DataFrame, by: Sequence[str], metrics: Sequence[str],
                 seed: int = 0, n_resamples: int = 2000) -> pd.DataFrame:
    """Long table: one row per group of ``by`` and metric, with ``mean, low, high, n``
    (percentile-bootstrap 95 % interval of the mean, NaNs dropped; a metric missing from
    ``frame``, e.g. BLEURT when not computed, gets NaNs and ``n = 0``)."""
    from .stats import bootstrap_ci

    rows = []
    for key, group in frame.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            values = group[metric].astype(float) if metric in group else pd.Series([], dtype=float)
            mean, low, high = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
            rows.append(dict(zip(by, key), metric=metric, mean=mean, low=low, high=high,
                             n=int(values.notna().sum())))
    return pd.DataFrame(rows)


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
