"""Figures for the neurons' properties: heatmaps and masks, metric bars with intervals."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..tiny.scenes import ATTRIBUTION

METHOD_COLOURS = {"contribution": "#DD8452", "gradient": "#4C72B0", "gradient_image": "#55A868",
                  "random": "#8C8C8C"}
HEAT_CMAP = "jet"


def heatmap_overlay(image, heat: np.ndarray, mask: np.ndarray | None = None, ax=None,
                    title: str | None = None, boxes=None, alpha: float = 0.55,
                    colorbar: bool | None = None, vmin: float | None = None, vmax: float | None = None):
    """``heat`` (``Float[ndarray, "H W"]``, same size as ``image``) over the image; ``mask`` as
    a contour.

    ``boxes``: ``(x0, y0, x1, y1)`` rectangles drawn in white (e.g. the noun's box).
    ``colorbar``: draw the colour scale beside the image (default: when the figure is this
    function's own, not a given ``ax``). ``vmin``/``vmax``: the colour scale's ends (default:
    the map's own minimum and maximum). Returns the figure.
    """
    own = ax is None
    fig, ax = plt.subplots(figsize=(3.3 if colorbar is not False else 2.6, 2.6),
                           layout="constrained") if own else (ax.figure, ax)
    ax.imshow(image, interpolation="nearest")
    shown = ax.imshow(heat, cmap=HEAT_CMAP, alpha=alpha, interpolation="nearest", vmin=vmin, vmax=vmax,
                      extent=(-0.5, image.width - 0.5, image.height - 0.5, -0.5))
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask, levels=[0.5], colors="white", linewidths=1.2)
    for x0, y0, x1, y1 in boxes or ():
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                   edgecolor="white", linestyle="--", linewidth=1))
    ax.set_xticks([])
    ax.set_yticks([])
    if title or own:
        ax.set_title(title or "unit activation map", fontsize=8)
    if colorbar or (colorbar is None and own):
        bar = fig.colorbar(shown, ax=ax, shrink=0.8, pad=0.02)
        bar.set_label("activation p · a", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    return fig


def _grid(titles, columns: int | None):
    """``(rows, columns, {title: (row, column)})``: titles ``"method: top-k"`` as a grid of
    methods (rows) × k (columns); any other titles row by row, ``columns`` (default up to 4)
    a row."""
    parts = [title.split(": ", 1) for title in titles]
    if columns is None and len(titles) > 1 and all(len(part) == 2 for part in parts):
        row_names = list(dict.fromkeys(part[0] for part in parts))
        column_names = list(dict.fromkeys(part[1] for part in parts))
        if len(row_names) > 1 and len(column_names) > 1:
            return len(row_names), len(column_names), {
                title: (row_names.index(a), column_names.index(b)) for title, (a, b) in zip(titles, parts)}
    columns = max(1, min(columns or 4, len(titles)))
    return -(-len(titles) // columns), columns, {title: divmod(i, columns) for i, title in enumerate(titles)}


def heatmap_panels(image, heats: dict, masks: dict | None = None, boxes=None,
                   width: float = 2.3, attribution: str = ATTRIBUTION, noun: str | None = None,
                   title: str | None = None, columns: int | None = None):
    """One overlay per entry of ``heats`` (title → ``Float[ndarray, "H W"]``) in a grid, with one
    colour bar.

    Titles of the form ``"method: top-k"`` make a grid of methods (rows) × k (columns); other
    titles fill rows of ``columns`` panels (default up to 4). Each map is drawn on its own scale
    (its minimum to its maximum, as the colour bar says): the maps show *where* units fire, not
    how strongly one method's units fire against another's. ``noun``: named in the figure's
    title (``title`` replaces it). ``attribution``: the image credit under them (``""`` for none).
    """
    import matplotlib.cm
    import matplotlib.colors

    rows, columns, where = _grid(list(heats), columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns + 1.0, (width + 0.3) * rows + 0.5),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for panel, heat in heats.items():
        ax = axes[where[panel]]
        ax.axis("on")
        heat = np.asarray(heat, dtype=float)
        low, high = float(np.nanmin(heat)), float(np.nanmax(heat))
        scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
        heatmap_overlay(image, scaled, (masks or {}).get(panel), ax=ax, title=panel, boxes=boxes,
                        vmin=0.0, vmax=1.0)
    scale = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap=HEAT_CMAP)
    bar = fig.colorbar(scale, ax=axes, shrink=0.9 if rows == 1 else 0.5, pad=0.01, aspect=30 if rows > 2 else 15)
    bar.set_ticks([0, 0.5, 1], labels=["min", "", "max"])
    bar.set_label("mean activation p · a of the units\n(each panel on its own scale)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    named = f" for '{noun}'" if noun else ""
    key = [part for part, shown in (("white contour: top 5 % of the map", masks),
                                    ("dashed box: the object", boxes)) if shown]
    fig.suptitle(title or f"Where the top-k units{named} fire" + (f"\n({'; '.join(key)})" if key else ""),
                 fontsize=9)
    if attribution:
        fig.supxlabel(attribution, fontsize=5, color="gray", x=0.01, ha="left")
    return fig


def metric_bars(summary, metric: str, chance: dict | None = None, width: float = 3.2,
                title: str | None = None):
    """Bars with 95 % intervals: one panel per model, one bar per method.

    ``summary``: DataFrame with columns ``model, method, metric, mean, low, high``
    (as ``metrics.summarize_ci`` returns). ``chance``: model → a level drawn dashed.
    ``title``: the figure's title (default: the metric's name and what the marks mean).
    """
    rows = summary[summary.metric == metric]
    models = list(dict.fromkeys(rows.model))
    fig, axes = plt.subplots(1, len(models), figsize=(width * len(models), 2.9), squeeze=False,
                             sharey=True)
    for ax, model in zip(axes.flat, models):
        part = rows[rows.model == model]
        x = np.arange(len(part))
        colours = [METHOD_COLOURS.get(m, "#55A868") for m in part.method]
        ax.bar(x, part["mean"], color=colours)
        ax.errorbar(x, part["mean"], yerr=[part["mean"] - part.low, part.high - part["mean"]],
                    fmt="none", ecolor="black", capsize=3, linewidth=1)
        ax.set_xticks(x, [m.replace("_", "\n") for m in part.method], fontsize=7)
        ax.set_xlabel("units selected by", fontsize=8)
        ax.set_title(model, fontsize=9)
        if chance and model in chance:
            ax.axhline(chance[model], color="black", linestyle="--", linewidth=0.8)
    axes.flat[0].set_ylabel(metric.replace("_", " "))
    marks = "bars: 95 % intervals" + ("; dashed: chance" if chance else "")
    fig.suptitle(title or f"{metric.replace('_', ' ')} per method ({marks})", fontsize=9)
    fig.tight_layout()
    return fig


def jaccard_bars(summary, width: float = 3.4, title: str | None = None):
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
        ax.set_xlabel("units selected by", fontsize=8)
        ax.set_title(model, fontsize=9)
    axes.flat[0].set_ylabel("Jaccard of top-k sets")
    from matplotlib.patches import Patch
    key = [Patch(facecolor="#BBBBBB", edgecolor="white", hatch=hatch, label=label)
           for label, hatch in (("same", ""), ("different", "//"))]
    axes.flat[-1].legend(handles=key, fontsize=7, title="noun in the\nother image", title_fontsize=7,
                         loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(title or "Cross-image invariance: overlap of the top-k units across images "
                          "(95 % intervals)", fontsize=9)
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
        # the interquartile range as bars of its own: a skewed group's mean may lie outside it
        ax.vlines(x, low, high, color="#8C3B0C", linewidth=1.2, label="interquartile range")
        ax.plot(x, means, "o-", color="#8C3B0C", linewidth=1.2, label="mean")
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
