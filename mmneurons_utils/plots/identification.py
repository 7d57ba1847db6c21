"""Figures. Each function returns a matplotlib Figure; notebooks show and save it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker

from ..method.units import Unit
from ..properties.metrics import depth_summary
from ..tiny.scenes import ATTRIBUTION


def scene_grid(scenes, captions=None, columns: int = 4, width: float = 2.6,
               attribution: str = ATTRIBUTION):
    """Scenes (or any samples) with their ground-truth caption — a sample without one shows
    its ``name`` — and, if given, the generated captions.

    A generated caption that differs from the truth is drawn in red. ``attribution``: the
    image credit printed under the grid (the scenes' OpenMoji credit; ``""`` for none).
    """
    rows = -(-len(scenes) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * width, rows * (width + 0.9)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, scene in enumerate(scenes):
        ax = axes.flat[i]
        ax.imshow(scene.image, interpolation="nearest")
        truth = getattr(scene, "caption", None)
        lines = ["truth: " + truth if truth else str(getattr(scene, "name", f"image {i}"))]
        colour = "black"
        if captions is not None:
            lines.append("model: " + captions[i].text)
            colour = "crimson" if truth and captions[i].text != truth else "black"
        wrapped = [part for line in lines for part in textwrap.wrap(line, 34)]
        ax.set_title("\n".join(wrapped), fontsize=7, color=colour, loc="left")
    if attribution:
        fig.text(0.01, 0.003, attribution, fontsize=6, color="gray")
    fig.tight_layout()
    return fig


def save(fig, folder: str | Path, name: str) -> Path:
    """Save ``fig`` as ``folder/name.png`` (folder created) and return the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def layer_distribution(shares: dict, top_k: int, width: float = 3.6):
    """The paper's layer-distribution figure: share of top-k units per layer, one panel per model.

    ``shares``: model name → ``pandas.Series`` indexed by layer (see ``metrics.layer_distribution``).
    """
    fig, axes = plt.subplots(1, len(shares), figsize=(width * len(shares), 2.8), squeeze=False,
                             sharey=True)
    for ax, (name, share) in zip(axes.flat, shares.items()):
        ax.bar(share.index, share.values, color="#4C72B0")
        if len(share) <= 12:
            ax.set_xticks(list(share.index))
        else:   # a deep model: a tick every few layers, so the numbers never run together
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=8, integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_title(f"{name}: top-{top_k} units", fontsize=9)
    axes.flat[0].set_ylabel("share of units")
    fig.tight_layout()
    return fig


def layer_depth(shares: dict, top_k: int):
    """Models of any depth on one axis: the cumulative share of top-k units against relative depth
    (layer ``l`` of ``L`` drawn at ``(l + 1) / L``), so a 4-layer and a 30-layer model compare; the
    dotted line is what units spread evenly over the layers would give. ``shares``: as
    :func:`layer_distribution` takes."""
    fig, ax = plt.subplots(figsize=(4.4, 3.0))
    for name, share in shares.items():
        n = len(share)
        depth = [0.0] + [(l + 1) / n for l in range(n)]
        upper = depth_summary(share)["upper_half"]
        ax.step(depth, [0.0] + list(share.cumsum()), where="post",
                label=f"{name}: {n} layers, upper half {upper:.2f}")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
    ax.axvline(0.5, color="grey", lw=0.5)
    ax.set_xlabel("relative depth (layer / number of layers)")
    ax.set_ylabel(f"cumulative share of top-{top_k} units")
    ax.set_title(f"Where the top-{top_k} units sit (dotted: spread evenly)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    return fig


def neuron_bars(table, noun: str, width: float = 6.0, title: str | None = None):
    """Contribution scores of one noun's top units, labelled ``L3.741 (−) [top tokens]``:
    the unit's polarity (the sign of its coefficient; ``−`` units write the noun through
    ``−W_out``, drawn in blue, ``+`` units in orange, as the legend says) and its top tokens
    in that direction."""
    from matplotlib.patches import Patch

    rows = table[table.noun == noun]
    fig, ax = plt.subplots(figsize=(width, 0.32 * len(rows) + 1.4), layout="constrained")
    signs = list(rows.polarity) if "polarity" in rows else [1] * len(rows)
    labels = [f"{Unit(r.layer, r.unit, s)}  [{', '.join(r.top_tokens[:4])}]"
              for r, s in zip(rows.itertuples(), signs)]
    ax.barh(range(len(rows)), rows.score, color=[POLARITY_COLOURS[-1 if s < 0 else 1] for s in signs])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_ylabel("unit (polarity) [top tokens]", fontsize=8)
    ax.set_xlabel(f"contribution to '{noun}'")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(4))
    ax.set_title(title or f"Top {len(rows)} units for '{noun}'", fontsize=9)
    fig.legend(handles=[Patch(color=POLARITY_COLOURS[1], label="(+) writes the noun through +W_out"),
                        Patch(color=POLARITY_COLOURS[-1], label="(−) writes it through −W_out")],
               fontsize=7, ncol=2, loc="outside lower center", title="polarity", title_fontsize=7,
               frameon=False)
    return fig


POLARITY_COLOURS = {1: "#DD8452", -1: "#4C72B0"}
