"""Figures. Each function returns a matplotlib Figure; notebooks show and save it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use(matplotlib.get_backend())  # keep inline backends; Agg when headless
import matplotlib.pyplot as plt  # noqa: E402

from .scenes import ATTRIBUTION  # noqa: E402


def scene_grid(scenes, captions=None, columns: int = 4, width: float = 2.6):
    """Scenes with their ground-truth (and, if given, generated) captions.

    A generated caption that differs from the truth is drawn in red.
    """
    rows = -(-len(scenes) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * width, rows * (width + 0.9)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, scene in enumerate(scenes):
        ax = axes.flat[i]
        ax.imshow(scene.image, interpolation="nearest")
        label = "truth: " + scene.caption
        colour = "black"
        if captions is not None:
            said = captions[i].text
            label += "\nmodel: " + said
            colour = "black" if said == scene.caption else "crimson"
        ax.set_title("\n".join(textwrap.wrap(label, 34)), fontsize=7, color=colour, loc="left")
    fig.text(0.01, 0.003, ATTRIBUTION, fontsize=6, color="gray")
    fig.tight_layout()
    return fig


def save(fig, folder: str | Path, name: str) -> Path:
    """Save ``fig`` as ``folder/name.png`` (folder created) and return the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
