"""Figures for the neurons' properties: heatmaps and masks, metric bars with intervals."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..tiny.scenes import ATTRIBUTION

METHOD_COLOURS = {"contribution": "#DD8452", "gradient": "#4C72B0", "gradient_image": "#55A868",
                  "random": "#8C8C8C"}


def heatmap_overlay(image, heat: np.ndarray, mask: np.ndarray | None = None, ax=None,
                    title: str | None = None, boxes=None, alpha: float = 0.55):
    """``heat`` (``Float[ndarray, "H W"]``, same size as ``image``) over the image; ``mask`` as
    a contour.

    ``boxes``: ``(x0, y0, x1, y1)`` rectangles drawn in white (e.g. the noun's box).
    Returns the figure.
    """
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(2.6, 2.6))
    ax.imshow(image, interpolation="nearest")
    ax.imshow(heat, cmap="jet", alpha=alpha, interpolation="nearest",
              extent=(-0.5, image.width - 0.5, image.height - 0.5, -0.5))
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask, levels=[0.5], colors="white", linewidths=1.2)
    for x0, y0, x1, y1 in boxes or ():
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="white", linestyle="--", linewidth=1))
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return fig


def heatmap_panels(image, heats: dict, masks: dict | None = None, boxes=None,
                   width: float = 2.3, attribution: str = ATTRIBUTION):
    """One overlay per entry of ``heats`` (title → ``Float[ndarray, "H W"]``), side by side;
    ``attribution``: the image credit under them (``""`` for none)."""
    fig, axes = plt.subplots(1, len(heats), figsize=(width * len(heats), width + 0.4),
                             squeeze=False)
    for ax, (title, heat) in zip(axes.flat, heats.items()):
        heatmap_overlay(image, heat, (masks or {}).get(title), ax=ax, title=title, boxes=boxes)
    if attribution:
        fig.text(0.01, 0.0, attribution, fontsize=5, color="gray")
    fig.tight_layout()
    return fig


def metric_bars(summary, metric: str, chance: dict | None = None, width: float = 3.2):
    """Bars with 95 % intervals: one panel per model, one bar per method.

    ``summary``: DataFrame with columns ``model, method, metric, mean, low, high``
    (as ``metrics.summarize_ci`` returns). ``chance``: model → a level drawn dashed.
    """
    rows = summary[summary.metric == metric]
    models = list(dict.fromkeys(rows.model))
    fig, axes = plt.subplots(1, len(models), figsize=(width * len(models), 2.6), squeeze=False,
                             sharey=True)
    for ax, model in zip(axes.flat, models):
        part = rows[rows.model == model]
        x = np.arange(len(part))
        colours = [METHOD_COLOURS.get(m, "#55A868") for m in part.method]
        ax.bar(x, part["mean"], color=colours)
        ax.errorbar(x, part["mean"], yerr=[part["mean"] - part.low, part.high - part["mean"]],
                    fmt="none", ecolor="black", capsize=3, linewidth=1)
        ax.set_xticks(x, [m.replace("_", "\n") for m in part.method], fontsize=7)
        ax.set_title(model, fontsize=9)
        if chance and model in chance:
            ax.axhline(chance[model], color="black", linestyle="--", linewidth=0.8)
    axes.flat[0].set_ylabel(metric.replace("_", " "))
    fig.tight_layout()
    return fig


def jaccard_bars(summary, width: float = 3.4):
    """Cross-image invariance: Jaccard of top-k sets for the same noun vs different nouns,
    per method, one panel per model. ``summary`` as ``metrics.summarize_ci`` returns."""
    models = list(dict.fromkeys(summary.model))
    fig, axes = plt.subplots(1, len(models), figsize=(width * len(models), 2.6), squeeze=False,
                             sharey=True)
    for ax, model in zip(axes.flat, models):
        part = summary[summary.model == model]
        methods = list(dict.fromkeys(part.method))
        x = np.arange(len(methods))
        for offset, metric, hatch in ((-0.2, "jaccard_same", ""), (0.2, "jaccard_different", "//")):
            rows = part[part.metric == metric].set_index("method").reindex(methods)
            ax.bar(x + offset, rows["mean"], width=0.4, hatch=hatch, edgecolor="white",
                   color=[METHOD_COLOURS.get(m, "#55A868") for m in methods],
                   label=metric.replace("jaccard_", ""))
            ax.errorbar(x + offset, rows["mean"], yerr=[rows["mean"] - rows.low, rows.high - rows["mean"]],
                        fmt="none", ecolor="black", capsize=2, linewidth=1)
        ax.set_xticks(x, [m.replace("_", "\n") for m in methods], fontsize=7)
        ax.set_title(model, fontsize=9)
    axes.flat[0].set_ylabel("Jaccard of top-k sets")
    axes.flat[0].legend(fontsize=7, title="noun", title_fontsize=7)
    fig.tight_layout()
    return fig


def occlusion_locality_plot(locality, width: float = 4.2):
    """Where painting the object out changes the model, stage by stage: the change's share
    inside the object's box (one dot per object, the mean with its interquartile range) against
    the chance level (the box's share of the image, dashed). One panel per ``model`` when the
    frame has that column. ``locality``: rows of
    :func:`~mmneurons_utils.properties.locality.occlusion_locality`."""
    frame = locality if "model" in locality else locality.assign(model="")
    models = list(dict.fromkeys(frame.model))
    fig, axes = plt.subplots(1, len(models), figsize=(width * len(models), 3.0), squeeze=False,
                             sharey=True)
    rng = np.random.default_rng(0)            # jitter of the dots only
    for ax, model in zip(axes.flat, models):
        part = frame[frame.model == model]
        stages = part.drop_duplicates("stage").sort_values("stage_index").stage.tolist()
        x = np.arange(len(stages))
        groups = [part[part.stage == stage] for stage in stages]
        for i, group in enumerate(groups):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(group)), group.share_in_box, s=8,
                       color="#DD8452", alpha=0.35, linewidth=0, label="one object" if i == 0 else None)
        means = [g.share_in_box.mean() for g in groups]
        low = [g.share_in_box.quantile(0.25) for g in groups]
        high = [g.share_in_box.quantile(0.75) for g in groups]
        ax.errorbar(x, means, yerr=[np.subtract(means, low), np.subtract(high, means)], fmt="o-",
                    color="#8C3B0C", capsize=3, linewidth=1.2, label="mean (interquartile range)")
        ax.plot(x, [g.box_share.mean() for g in groups], "k--", linewidth=0.9,
                label="chance (box share of the image)")
        ax.set_xticks(x, [s.replace("LM layer ", "LM\nlayer ").replace("vision ", "vision\n")
                          for s in stages], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_xlabel("stage")
        ax.set_title(f"{model}: occlusion change inside the box" if model else
                     "Occlusion change inside the box", fontsize=9)
    axes.flat[0].set_ylabel("share of the change in the box")
    axes.flat[0].legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    return fig
