"""Atlas figures: a unit's strip of top dataset images (each with its map), the atlas units'
purity against random units, and their modality."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt

from ..atlas.examples import covered_images
from ..method.units import Unit
from ..tiny.scenes import ATTRIBUTION
from ..properties.specificity import patch_grid, percentile_mask, unit_maps, upsample
from .properties import METHOD_COLOURS, heatmap_overlay


def example_strip(vlm, images, row, n: int = 6, captions=None, width: float = 1.7,
                  attribution: str = ATTRIBUTION, ident=None):
    """A unit's top dataset images side by side, each overlaid with the unit's map ``p · a``
    (upsampled, 95th-percentile mask as a contour; the plain image for models without a
    patch grid).

    ``row``: an atlas row (or dict) with ``layer, unit, polarity, example_images`` and
    optionally ``example_scores`` and ``noun``; ``images``: the images those indices name;
    ``captions``: their caption texts (shown under each image; default: ``ident``'s texts for
    the images it holds). ``ident``: the :class:`~mmneurons_utils.method.identification.
    Identification` of the first ``ident.n_images`` of ``images`` (with image activations):
    the maps of those images are read from it, the others' need a prefill. Returns the figure.
    """

    get = row.get if isinstance(row, dict) else row.__getitem__
    indices = [int(i) for i in list(get("example_images"))[:n]]
    scores = list(get("example_scores"))[:n] if _has(row, "example_scores") else [None] * len(indices)
    layer, unit, sign = int(get("layer")), int(get("unit")), int(get("polarity"))
    fig, axes = plt.subplots(1, max(len(indices), 1), figsize=(width * max(len(indices), 1), width + 0.8),
                             squeeze=False)
    grid = patch_grid(vlm)
    covered = covered_images(ident, images)
    run = [i for i in indices if i >= covered]            # not held by ident: one prefill
    ran = (dict(zip(run, vlm.describe([images[i] for i in run], max_new_tokens=1,
                                      activation="down_proj_input", image_activations=True)))
           if grid is not None and run else {})
    caps = [None if grid is None else ident.captions[i] if i < covered else ran[i] for i in indices]
    if captions is None and covered:
        captions = {i: ident.captions[i].text for i in range(covered)}
    for ax, index, score, cap in zip(axes.flat, indices, scores, caps):
        image = images[index].convert("RGB")
        title = f"#{index}" + (f"  {score:.2f}" if score is not None else "")
        if captions is not None and (index in captions if isinstance(captions, dict) else True):
            title += "\n" + "\n".join(textwrap.wrap(str(captions[index]), 22)[:2])
        if cap is None:
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=7)
            continue
        grid_map = unit_maps(vlm, cap.activations, [[layer, unit]], [sign])[0]
        heat = upsample(grid_map, (image.height, image.width), smooth=True)
        heatmap_overlay(image, heat, percentile_mask(heat), ax=ax, title=title)
        ax.title.set_fontsize(7)
    for ax in list(axes.flat)[len(indices):]:
        ax.axis("off")
    noun = f" — '{get('noun')}'" if _has(row, "noun") else ""
    fig.suptitle(f"{Unit(layer, unit, sign)}{noun}: top dataset images",
                 fontsize=9)
    if attribution:   # the image credit (the scenes' OpenMoji credit; "" for none)
        fig.text(0.01, 0.0, attribution, fontsize=5, color="gray")
    fig.tight_layout()
    return fig


def _has(row, key) -> bool:
    return key in row if isinstance(row, dict) else key in getattr(row, "index", ())


def purity_scatter(table, width: float = 3.4):
    """Per noun: the mean purity of its atlas units (contribution) against the purity of the
    random units drawn for its images, with the diagonal (no better than random) dashed.

    ``table``: :func:`~mmneurons_utils.atlas.build.build_atlas` rows (``noun, purity,
    purity_random, base_rate``). A point's size grows with the noun's number of images.
    """
    import numpy as np


    nouns = (table.groupby("noun", sort=True)
             .agg(purity=("purity", "mean"), purity_random=("purity_random", "first"),
                  n_images=("n_images", "first"))
             .astype(float))
    fig, ax = plt.subplots(figsize=(width, width))
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=0.8)
    ax.scatter(nouns.purity_random, nouns.purity, s=8 + 4 * nouns.n_images,
               color=METHOD_COLOURS["contribution"], alpha=0.7, edgecolor="white", linewidth=0.5)
    mean_ours, mean_random = float(table["purity"].mean()), float(table["purity_random"].mean())
    ax.scatter([mean_random], [mean_ours], marker="X", s=70, color="black", zorder=3,
               label=f"mean: {mean_ours:.2f} vs {mean_random:.2f}")
    top = float(np.nanmax([nouns.purity.max(), nouns.purity_random.max(), 0.1]))
    limit = min(1.0, 1.1 * top)
    ax.set_xlim(0, limit)
    ax.set_ylim(0, limit)
    ax.set_xlabel("purity of random units", fontsize=8)
    ax.set_ylabel("purity of the noun's atlas units", fontsize=8)
    ax.set_title(f"{len(nouns)} nouns: top images that say the noun", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def modality_histogram(table, bins: int = 20, width: float = 4.2, title: str | None = None):
    """Histogram of the atlas units' ``modality`` (share of ``|a|`` on the image tokens: 1 = only
    on the image, 0 = only at the caption steps), one count per (noun, unit) row."""
    import numpy as np

    values = table["modality"].dropna().to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(width, 2.6))
    ax.hist(values, bins=np.linspace(0, 1, bins + 1), color="#4C72B0", edgecolor="white")
    if len(values):
        ax.axvline(values.mean(), color="black", linestyle="--", linewidth=0.8,
                   label=f"mean {values.mean():.2f}")
        ax.legend(fontsize=7)
    ax.axvline(0.5, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("modality: share of |a| on image tokens (0 = caption steps only)", fontsize=8)
    ax.set_ylabel("(noun, unit) pairs", fontsize=8)
    ax.set_title(title or "Where the atlas units fire: image tokens or caption steps", fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig
