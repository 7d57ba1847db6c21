"""The neuron browser's strip of dataset examples: a unit's top images, each with its map."""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt

from ..scenes import ATTRIBUTION


def example_strip(vlm, images, row, n: int = 6, captions=None, width: float = 1.7):
    """A unit's top dataset images side by side, each overlaid with the unit's map ``p · a``
    (upsampled, 95th-percentile mask as a contour; the plain image for models without a
    patch grid).

    ``row``: an atlas row (or dict) with ``layer, unit, polarity, example_images`` and
    optionally ``example_scores`` and ``noun``; ``images``: the images those indices name;
    ``captions``: their caption texts (shown under each image). Returns the figure.
    """
    from ..atlas_html import unit_label
    from ..specificity import patch_grid, percentile_mask, unit_maps, upsample
    from .properties import heatmap_overlay

    get = row.get if isinstance(row, dict) else row.__getitem__
    indices = [int(i) for i in list(get("example_images"))[:n]]
    scores = list(get("example_scores"))[:n] if _has(row, "example_scores") else [None] * len(indices)
    layer, unit, sign = int(get("layer")), int(get("unit")), int(get("polarity"))
    fig, axes = plt.subplots(1, max(len(indices), 1), figsize=(width * max(len(indices), 1), width + 0.8),
                             squeeze=False)
    grid = patch_grid(vlm)
    caps = (vlm.describe([images[i] for i in indices], max_new_tokens=1, capture="down_proj_input",
                         image_activations=True) if grid is not None and indices else [None] * len(indices))
    for ax, index, score, cap in zip(axes.flat, indices, scores, caps):
        image = images[index].convert("RGB")
        title = f"#{index}" + (f"  {score:.2f}" if score is not None else "")
        if captions is not None:
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
    fig.suptitle(f"{unit_label(dict(layer=layer, unit=unit, polarity=sign))}{noun}: top dataset images",
                 fontsize=9)
    fig.text(0.01, 0.0, ATTRIBUTION, fontsize=5, color="gray")
    fig.tight_layout()
    return fig


def _has(row, key) -> bool:
    return key in row if isinstance(row, dict) else key in getattr(row, "index", ())
