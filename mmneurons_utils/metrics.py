"""Metrics over identified neurons (each a plain function of tables or score maps)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .scoring import rank_correlation, top_overlap


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
    """Share of (noun, neuron) rows whose top tokens contain the noun itself (NaN if no rows)."""
    if not len(table):
        return float("nan")
    return float(np.mean([noun in tokens for noun, tokens in zip(table.noun, table.top_tokens)]))
