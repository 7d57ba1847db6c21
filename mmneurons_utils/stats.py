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
