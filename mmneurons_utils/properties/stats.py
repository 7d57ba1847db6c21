"""Small statistics the property metrics share."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def bootstrap_ci(values, n_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its percentile-bootstrap ``level`` interval.

    NaNs are dropped first; with no values left all three are NaN, with one value the
    interval is that value.
    """
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_resamples, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)


def cluster_bootstrap_ci(values, clusters, n_resamples: int = 2000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``values`` whose rows come in ``clusters`` (e.g. the image of
    each (image, noun) row): the mean over all rows and a percentile-bootstrap ``level``
    interval that resamples **clusters** with replacement, each resample's statistic being
    the mean over all rows of the drawn clusters.

    Rows of one image are not independent, so resampling rows gives too narrow an
    interval. NaN values are dropped first (a cluster left with no rows drops out); with
    no values left all three are NaN. With one row per cluster, listed in sorted cluster
    order, this is :func:`bootstrap_ci` (the same draws for the same ``seed``).
    """
    x = np.asarray(values, dtype=float)
    groups = np.asarray(clusters)
    if x.shape != groups.shape:
        raise ValueError(f"values and clusters must have the same length, got {x.shape} and "
                         f"{groups.shape}")
    keep = ~np.isnan(x)
    x, groups = x[keep], groups[keep]
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    _, index = np.unique(groups, return_inverse=True)
    sums = np.bincount(index, weights=x)                                   # (n_clusters,)
    counts = np.bincount(index).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sums), size=(n_resamples, len(sums)))     # clusters per resample
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(x.mean()), float(low), float(high)


def auroc(positive, negative) -> float:
    """Area under the ROC curve: P(a positive scores above a negative), ties count half.

    (The Mann–Whitney U statistic over ``len(positive) · len(negative)``.) NaN when
    either side is empty.
    """
    from scipy.stats import mannwhitneyu

    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def jaccard(a: Iterable, b: Iterable) -> float:
    """``|a ∩ b| / |a ∪ b|`` of two sets (1.0 for two empty sets)."""
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def of_methods(table, methods=None):
    """``table``'s rows of ``methods`` (all of them for ``None``); ``ValueError`` naming the
    table's methods for one it lacks."""
    if methods is None:
        return table
    missing = [m for m in methods if m not in set(table["method"])]
    if missing:
        raise ValueError(f"the identification has no {', '.join(map(repr, missing))} rows; its methods: "
                         f"{', '.join(table['method'].unique())}")
    return table[table["method"].isin(list(methods))]
