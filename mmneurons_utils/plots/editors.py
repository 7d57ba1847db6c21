"""The editor comparison in one figure: success against locality per editor, and success
against the number of weights each editor changes (log axis)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D

from .properties import METHOD_COLOURS

EDITOR_COLOURS = {"ft": "#8c564b", "lora": "#e377c2", "rome": "#17becf"}


def _label(row) -> str:
    return f"{row.method} k={row.k}" if row.method not in EDITOR_COLOURS else row.method


def _bars(summary, metric):
    """``Float[ndarray, "2 M"]``: lower / upper error-bar lengths of ``metric``'s interval."""
    mean = summary[metric].to_numpy(float)
    return np.nan_to_num(np.abs(np.stack([mean - summary[f"{metric}_low"].to_numpy(float),
                                          summary[f"{metric}_high"].to_numpy(float) - mean])))


MARKERS = {1: "v", 5: "o", 20: "^"}


def editor_comparison(summary, success: str = "success", locality: str = "m_locality",
                      params: str = "params_changed", trained: str = "params_trained",
                      title: str | None = None):
    """Two panels from :func:`~mmneurons_utils.batch.editor_comparison.summarize_editors`:
    ``success`` (y) against ``locality`` (x), and against ``params`` (weights changed, filled) on
    a log x axis, with ``trained`` (the editor's degrees of freedom, hollow, joined by a line)
    where it differs; one point per editor with its 95 % bootstrap intervals as bars.

    The editors are named in one legend beside the panels (colour: the units' method or the
    editor; marker: ``k``), never by labels at the points, which pile up where editors agree.
    An editor that applied no edit has no locality: the legend says so.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), layout="constrained")
    handles = []
    for row in summary.itertuples():
        colour = EDITOR_COLOURS.get(row.method, METHOD_COLOURS.get(row.method))
        marker = "s" if row.method in EDITOR_COLOURS else MARKERS.get(row.k, "o")
        one = summary[(summary.method == row.method) & (summary.k == row.k)]
        label = _label(row)
        if np.isnan(float(one[locality].iloc[0])):
            label += f" (no {locality})"
        handles.append(axes[0].errorbar(one[locality], one[success], xerr=_bars(one, locality),
                                        yerr=_bars(one, success), fmt=marker, ms=5, capsize=2,
                                        color=colour, label=label, alpha=0.85))
        x, y = float(one[params].iloc[0]), float(one[success].iloc[0])
        axes[1].errorbar(one[params], one[success], yerr=_bars(one, success), fmt=marker, ms=5,
                         capsize=2, color=colour, alpha=0.85)
        if trained in one and float(one[trained].iloc[0]) != x:
            axes[1].plot([float(one[trained].iloc[0]), x], [y, y], color=colour, lw=0.6, ls=":")
            axes[1].plot(float(one[trained].iloc[0]), y, marker, ms=5, mfc="none", color=colour)
    axes[0].set_xlabel(f"{locality.replace('_', ' ')} (unrelated images kept)")
    axes[0].set_title("success against locality", fontsize=9)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("weights changed (filled) / trained (hollow), log")
    axes[1].set_title("success against the edit's size", fontsize=9)
    for ax in axes:
        ax.set_ylabel(success.replace("_", " "))
        ax.set_ylim(-0.05, 1.08)
    key = [Line2D([], [], marker="o", ls="none", color="grey", label="weights changed"),
           Line2D([], [], marker="o", ls="none", mfc="none", color="grey", label="weights trained")]
    fig.legend(handles=handles + key, loc="outside right center", fontsize=7, title="editor",
               title_fontsize=7, frameon=False)
    n = int(summary.n_pairs.max()) if len(summary) else 0
    fig.suptitle(title or f"editors on the same {n} source → target pairs (95 % bootstrap intervals)",
                 fontsize=9)
    return fig
