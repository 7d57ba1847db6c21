"""Figures for the causal effect (perturbation curves) and editing (the evaluation table)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .properties import METHOD_COLOURS

CURVE_LABELS = {"margin_drop": "noun logit-margin drop", "prob_drop": "noun probability drop",
                "noun_removed": "share of captions losing the noun",
                "caption_changed": "share of captions changed"}
CURVE_UNITS = {"margin_drop": "logit margin drop", "prob_drop": "probability drop",
               "noun_removed": "share of captions", "caption_changed": "share of captions"}


def plural(n: int, one: str = "unit", many: str | None = None) -> str:
    """``"1 unit"``, ``"5 units"``: ``n`` with the noun in the right number."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def ablation_curves(summary, x: str = "k", perturbation: str | None = None,
                  metrics=("margin_drop", "noun_removed", "caption_changed"), width: float = 3.2):
    """Curves of ``metrics`` over ``x`` (``k`` or ``sigma``), one line per method.

    ``summary``: :func:`mmneurons_utils.interventions.causal.summarize` output (for ``x="sigma"`` add a
    ``sigma`` column). ``perturbation``: keep only that perturbation's rows.
    """
    data = summary if perturbation is None else summary[summary.perturbation == perturbation]
    fig, axes = plt.subplots(1, len(metrics), figsize=(width * len(metrics), 2.8), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for method, group in data.groupby("method", sort=True):
            group = group.sort_values(x)
            ax.plot(group[x], group[metric], marker="o", ms=3, label=method,
                    color=METHOD_COLOURS.get(method))
        if x == "k" and data[x].max() / max(data[x].min(), 1) > 20:
            ax.set_xscale("log")
        if metric in ("noun_removed", "caption_changed"):
            ax.set_ylim(-0.03, 1.03)
            ax.axhline(0.5, color="gray", lw=0.6, ls=":")
        ax.set_xlabel("units perturbed (k)" if x == "k" else "noise σ (× column RMS)")
        ax.set_ylabel(CURVE_UNITS.get(metric, metric.replace("_", " ")))
        ax.set_title(CURVE_LABELS.get(metric, metric), fontsize=9)
    axes.flat[0].legend(fontsize=7, title="units", title_fontsize=7)
    title = perturbation or ", ".join(sorted(data.perturbation.unique()))
    fig.suptitle(f"perturbing identified vs random units ({title})", fontsize=9)
    fig.tight_layout()
    return fig


def edit_bars(summary, metrics=("success", "generalization", "locality"), width: float | None = None,
              title: str | None = None):
    """Grouped bars: one group per ``(units, n_neurons)`` setting, one bar per metric.

    ``summary``: :func:`~mmneurons_utils.batch.edit_evaluation.summarize_edits` output. Each label
    says how many of the pairs' edits were applied (side effects average over those only); a
    metric with no applied edit to measure it is marked "n/a" instead of a bar. ``width``: the
    figure's width in inches (default: grows with the number of settings).
    """
    labels = [f"{u}\n{plural(int(n))}" for u, n in zip(summary.units, summary.n_neurons)]
    if {"n_applied", "n_pairs"} <= set(summary.columns):
        labels = [f"{label}\n{a}/{p} applied" for label, a, p in
                  zip(labels, summary.n_applied, summary.n_pairs)]
    x = np.arange(len(summary))
    step = 0.8 / len(metrics)
    width = width or max(6.5, 1.2 * len(summary) + 2.0)
    fig, ax = plt.subplots(figsize=(width, 3.2), layout="constrained")
    colours = ["#DD8452", "#55A868", "#4C72B0", "#8172B3"]
    missing = False
    for j, metric in enumerate(metrics):
        at = x + (j - (len(metrics) - 1) / 2) * step
        ax.bar(at, summary[metric], step, label=metric, color=colours[j % len(colours)])
        for xi, value in zip(at, summary[metric]):
            if value != value:  # NaN: nothing was measured
                missing = True
                ax.text(xi, 0.02, "n/a", ha="center", va="bottom", fontsize=8, color="dimgray",
                        fontweight="bold")
            elif value == 0:    # measured and zero: say so, a bar of height 0 is invisible
                ax.text(xi, 0.02, "0", ha="center", va="bottom", fontsize=8, color="dimgray")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_xlabel("units edited (method, number) and edits applied")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share")
    handles, names = ax.get_legend_handles_labels()
    if missing:
        from matplotlib.patches import Patch
        handles.append(Patch(color="none", label="n/a: no applied edit to measure"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False, title="metric", title_fontsize=7)
    n = int(summary.n_pairs.max()) if "n_pairs" in summary and len(summary) else None
    ax.set_title(title or ("Editing the top units: success and side effects"
                           + (f" over {n} source → target pairs" if n else "")), fontsize=9)
    return fig
