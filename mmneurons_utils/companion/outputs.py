"""What a notebook writes: full figures and CSV tables on disk, compact copies inline.

Every notebook gets one from its set-up (``session.outputs``, :mod:`.session`) and then

    outputs.figure(fig, "01_layer_distribution")   # <output_dir>/figures/…png, shown inline
    outputs.table(df, "01_layer_distribution")     # <output_dir>/tables/…csv, returns df

The file on disk is the full figure (``plots.save``: 110 dpi, true colour). The copy
shown inline — and so stored in the executed and the committed notebooks — is the
same figure at screen resolution (72 dpi) with its colours reduced to an adaptive
palette of 64 (no dithering), which compresses scenes and charts 4–6× and keeps a
committed notebook in the tens of kilobytes. nbval does not compare images, so the
compact copy changes nothing in CI; JupyterLab shows it at its natural size.
"""

from __future__ import annotations

import io
from pathlib import Path
from ..plots import save
from .tables import save_table

INLINE_DPI = 72
INLINE_COLORS = 64


def compact_png(fig, dpi: int = INLINE_DPI, colors: int = INLINE_COLORS) -> bytes:
    """``fig`` as a small palette PNG (``colors`` ≤ 256 adaptive colours, no dithering)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    image = Image.open(buffer).convert("RGB")
    palette = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT,
                             dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()


def show_figure(fig, output_dir: str | Path, name: str, display_inline: bool = True) -> Path:
    """Save ``fig`` in full as ``<output_dir>/figures/<name>.png``, show a compact copy, close it.

    Closing keeps the inline backend from showing the full-size figure a second time.
    Returns the saved path.
    """
    import matplotlib.pyplot as plt


    path = save(fig, Path(output_dir) / "figures", name)
    if display_inline:
        from IPython.display import Image, display

        display(Image(data=compact_png(fig), format="png"))
    plt.close(fig)
    return path


class Outputs:
    """A notebook's output folder: ``figures/`` (PNG) and ``tables/`` (CSV) under ``output_dir``."""

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir)
        self.figures = self.root / "figures"
        self.tables = self.root / "tables"

    def figure(self, fig, name: str, display_inline: bool = True) -> Path:
        """Save the figure in full, show its compact copy inline; returns the PNG's path."""
        return show_figure(fig, self.root, name, display_inline)

    def table(self, df, name: str):
        """Save ``df`` as ``tables/<name>.csv`` and return it unchanged (so a cell can end with it)."""

        save_table(df, self.root, name)
        return df

    def __repr__(self) -> str:
        return f"Outputs({str(self.root)!r})"
