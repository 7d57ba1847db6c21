"""Specificity: do a noun's neurons fire on the noun's own image patches?

A unit's **activation map** is its ``down_proj`` input at each image-token position
of the prefill (``Caption.activations.image`` from
``vlm.describe(..., activation="down_proj_input", image_activations=True)``), laid out on
the patch grid. The paper (and its official code) draws these maps upsampled onto
the image, with the 95th-percentile binary mask.

Beyond the paper, with the scenes' object boxes:

* **mass in box**: share of the map's positive mass that falls inside the noun's
  box(es), the map upsampled patch-exactly (nearest) to the image's pixels. A map
  spread evenly scores the box's share of the image (the chance level, ``box_share``).
* **pointing game**: whether the map's hottest patch has its centre inside a box.
* **centred maps** (``mass_in_box_centred``, ``pointing_hit_centred``): each unit's map minus
  its median over the patches (:func:`centred`), then averaged. A pretrained LM's top units
  have nearly flat maps (a large offset the same on every patch, a small bump on the object);
  the offset's positive mass spreads evenly, so the raw mass in box sits at chance whatever
  the bump does, while the centred map keeps only the bump. Subtracting per-unit constants
  shifts the mean map by a constant, so ``pointing_hit_centred`` equals ``pointing_hit``
  (it is reported beside it for the scorecard's symmetry; only mass in box changes). A map
  equal on every patch has no positive mass once centred: NaN (nothing local to measure).
* **occlusion maps** (``occlusion_mass_in_box``, ``occlusion_pointing_hit``; only with
  ``occlusion=True``, one extra prefill per (image, noun)): ``p · (a_original − a_occluded)``
  per patch, the noun's box(es) painted with the scene's background
  (:mod:`~mmneurons_utils.properties.occlusion`): the part of the activation the object is
  responsible for, wherever the unit reads it. Any unit's change is local (the painted patches
  change, the rest barely), so random units' occlusion mass in box is well above chance too;
  ``occlusion_signed_in_box`` (the signed share, :func:`signed_share_in_box`) is ≈ 0 for them.
* **selectivity**: a unit's image score (max of ``p · a`` over the image tokens) on
  images that contain its noun vs images that do not, as an AUROC (0.5 = blind).

Every map and score is read in the unit's **polarity** ``p`` (the ``polarity`` column of
a ``find_neurons`` table: the sign of its coefficient at the noun step): a unit that writes
the noun through ``−W_out[:, i]`` signals it with negative activations, so its map is
``p · a``. Without the sign, a mean map over units of both polarities cancels and the
positive-mass metrics read the wrong end of half the units.

Only families whose image tokens are a square row-major patch grid (LLaVA-1.5,
PaliGemma: ``Architecture.patch_grid``) have maps over the image. InstructBLIP's
tokens are Q-Former queries, each of which attends over the whole image: there,
maps and box metrics are not defined (``patch_grid`` returns ``None``) and only
selectivity, which needs no layout, is reported.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..data import objects
from .occlusion import occlusion_deltas
from ..method.identification import Identification, top_k_groups
from .stats import auroc, of_methods


def patch_grid(vlm) -> tuple[int, int] | None:
    """``(rows, cols)`` of the image tokens the language model reads, or ``None``.

    ``None`` when the family's tokens are not one patch grid (query tokens, tiles).
    """
    if not vlm.arch.patch_grid:
        return None
    n = vlm.n_image_tokens
    side = int(round(n ** 0.5))
    return (side, side) if side * side == n else None


def unit_maps(vlm, activations, units, polarity=None) -> np.ndarray:
    """``Float[ndarray, "N rows cols"]`` activation maps ``p · a`` of ``units``
    (``Int[ndarray, "N 2"]``).

    ``activations``: one image's :class:`~mmneurons_utils.model.capture.Activations` with
    ``image`` recorded (``Float[Tensor, "L I F"]``); ``polarity``: ``Int[ndarray, "N"]``
    of ±1 (default all ``+1``, the raw activation).
    """
    grid = patch_grid(vlm)
    if grid is None:
        raise ValueError(f"{vlm.name}: its image tokens ({vlm.arch.family}) are not a patch "
                         "grid, so there is no activation map over the image; use selectivity")
    if activations is None or activations.image is None:
        raise ValueError("activations lack image positions: describe the images with "
                         "activation='down_proj_input', image_activations=True")
    units = torch.as_tensor(np.array(units, dtype=np.int64).reshape(-1, 2))
    per_unit = activations.image[units[:, 0], :, units[:, 1]].float().cpu().numpy()  # (N, I)
    if polarity is not None:
        per_unit = per_unit * np.asarray(polarity, dtype=np.float32).reshape(-1, 1)
    return per_unit.reshape(len(units), *grid)


def upsample(grid_map: np.ndarray, size: tuple[int, int], smooth: bool = False) -> np.ndarray:
    """``Float[ndarray, "H W"]`` from a ``rows × cols`` map; ``size`` is ``(H, W)``.

    ``smooth=False`` repeats each patch over its pixels (exact for box metrics);
    ``True`` interpolates bilinearly (for display, as the official code does).
    """
    t = torch.as_tensor(np.asarray(grid_map, dtype=np.float32))[None, None]
    mode = dict(mode="bilinear", align_corners=False) if smooth else dict(mode="nearest")
    return torch.nn.functional.interpolate(t, size=tuple(size), **mode)[0, 0].numpy()


def percentile_mask(heat: np.ndarray, q: float = 95) -> np.ndarray:
    """``Bool[ndarray, "H W"]``: pixels at or above the ``q``-th percentile of ``heat``."""
    return heat >= np.percentile(heat, q)


def box_mask(size: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]]) -> np.ndarray:
    """``Bool[ndarray, "H W"]``: pixels inside any of ``boxes`` (``x0, y0, x1, y1``, end exclusive)."""
    mask = np.zeros(size, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(y0, 0):y1, max(x0, 0):x1] = True
    return mask


def mass_in_box(grid_map: np.ndarray, size: tuple[int, int], boxes) -> float:
    """Share of ``grid_map``'s positive mass inside ``boxes`` on an ``(H, W)`` image.

    NaN when the map has no positive mass (nothing fires anywhere).
    """
    heat = np.clip(upsample(grid_map, size), 0, None)
    total = heat.sum()
    return float(heat[box_mask(size, boxes)].sum() / total) if total > 0 else float("nan")


def pointing_hit(grid_map: np.ndarray, size: tuple[int, int], boxes) -> bool:
    """Whether the centre of ``grid_map``'s hottest patch lies inside one of ``boxes``."""
    rows, cols = grid_map.shape
    r, c = np.unravel_index(int(np.argmax(grid_map)), grid_map.shape)
    y, x = (r + 0.5) * size[0] / rows, (c + 0.5) * size[1] / cols
    return any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in boxes)


def box_share(size: tuple[int, int], boxes) -> float:
    """The chance level of ``mass_in_box``: the boxes' share of the image."""
    return float(box_mask(size, boxes).mean())


def box_scores(grid_map: np.ndarray, size: tuple[int, int], boxes) -> dict[str, float]:
    """``mass_in_box``, its chance level ``box_share`` and ``pointing_hit`` (0 or 1) of one map."""
    return dict(mass_in_box=mass_in_box(grid_map, size, boxes), box_share=box_share(size, boxes),
                pointing_hit=float(pointing_hit(grid_map, size, boxes)))


def signed_share_in_box(grid_map: np.ndarray, size: tuple[int, int], boxes) -> float:
    """``Σ_box m / Σ |m|`` of ``grid_map`` on an ``(H, W)`` image, in ``[−1, 1]``: the signed part
    of the map inside ``boxes`` over its whole absolute mass. For an occlusion map ``p · (a −
    a_occluded)`` it is ``> 0`` when removing the object lowers the units in their polarity
    there, ``≈ 0`` for units of random polarity (their changes cancel), whereas the positive
    mass in box of any map whose change is confined to the box is high. NaN for an all-zero map."""
    heat = upsample(grid_map, size)
    total = np.abs(heat).sum()
    return float(heat[box_mask(size, boxes)].sum() / total) if total > 0 else float("nan")


def centred(maps: np.ndarray) -> np.ndarray:
    """``Float[ndarray, "N rows cols"]``: each map of ``maps`` (same shape) minus its median over
    the patches: what a unit does on some patches more than on most. A map flat everywhere
    becomes all zeros (no positive mass: ``mass_in_box`` NaN)."""
    maps = np.asarray(maps, dtype=np.float64)
    flat = maps.reshape(len(maps), -1)
    return (flat - np.median(flat, axis=1, keepdims=True)).reshape(maps.shape)


def _suffixed(scores: dict, prefix: str = "", suffix: str = "") -> dict:
    """``mass_in_box`` and ``pointing_hit`` of :func:`box_scores` under new names."""
    return {f"{prefix}{key}{suffix}": scores[key] for key in ("mass_in_box", "pointing_hit")}


def image_unit_scores(captions) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, min)``, each ``Float[Tensor, "B L F"]``: each unit's largest and smallest
    activation over each image's tokens (the image score of a ``+`` / ``−`` unit is
    ``max`` / ``−min``). ``captions`` from ``describe(..., activation="down_proj_input",
    image_activations=True)``.
    """
    images = [c.activations.image.float() for c in captions]
    return (torch.stack([x.amax(dim=1).cpu() for x in images]),
            torch.stack([x.amin(dim=1).cpu() for x in images]))


def signed_image_scores(extremes: tuple[torch.Tensor, torch.Tensor], units,
                        polarity=None) -> np.ndarray:
    """``Float[ndarray, "B N"]``: ``max_j p · a_j`` of each unit over each image's
    tokens, from :func:`image_unit_scores`' ``(max, min)``."""
    units = np.asarray(units, dtype=np.int64).reshape(-1, 2)
    high, low = (x[:, units[:, 0], units[:, 1]].numpy() for x in extremes)     # (B, N) each
    signs = np.ones(len(units)) if polarity is None else np.asarray(polarity).reshape(-1)
    return np.where(signs > 0, high, -low)


def mean_maps(vlm, activations, units, ks: Sequence[int], size: tuple[int, int],
              smooth: bool = True, polarity=None) -> dict[str, np.ndarray]:
    """``"top-k"`` → the mean map ``p · a`` of the first ``k`` of ``units`` (rank order),
    upsampled to ``size`` = ``(H, W)``; ``k`` larger than ``len(units)`` is skipped."""
    maps = unit_maps(vlm, activations, units, polarity)
    return {f"top-{k}": upsample(maps[:k].mean(0), size, smooth) for k in ks if k <= len(maps)}


def specificity_scores(vlm, scenes, ident: Identification, k: int = 10, occlusion: bool = False,
                       batch_size: int = 16, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Box metrics and selectivity of each (image, noun, method)'s top-``k`` units.

    ``scenes``: the scenes ``ident`` (the :class:`Identification` of their images, with image
    activations: ``image_activations=True``) was made on, in its order; ``methods``: only these
    of its methods (default: all). Every
    scene is also a selectivity test image: a unit's ``auroc`` separates the scenes
    that contain the noun from those that do not by the unit's image score
    (``max p · a`` over the image tokens). Maps and scores use the table's ``polarity``
    (all ``+1`` when the table has no such column).

    Which images contain the noun: the samples' known objects (``nouns``: the scenes', or an
    annotation file's, matched by :func:`~mmneurons_utils.data.objects.contains`), or — for images
    with no labels at all (a bare folder) — the model's own captions (:func:`presence_source`).
    Boxes are matched to the noun by :func:`~mmneurons_utils.data.objects.boxes_for`; images
    without boxes get no box metrics.

    One row per (image, noun, method): ``in_scene`` (the noun is in the image),
    ``auroc`` (mean over the ``k`` units) and, for patch-grid models and nouns in the
    scene, ``mass_in_box``, ``box_share`` (its chance level) and ``pointing_hit`` of the mean
    raw map, ``mass_in_box_centred`` and ``pointing_hit_centred`` of the mean median-centred
    map (:func:`centred`) and, with ``occlusion=True``, ``occlusion_mass_in_box``,
    ``occlusion_pointing_hit`` and ``occlusion_signed_in_box`` (:func:`signed_share_in_box`) of
    the mean occlusion map ``p · (a − a_occluded)`` (one prefill per (image, noun) with boxes,
    ``batch_size`` images a forward; ignored without a patch grid). Painting an object out
    changes every unit mostly inside its box, so random units' occlusion mass in box is far
    above ``box_share`` too: compare with them, or read the signed share (random ≈ 0).
    """
    ident.check_made_on(scenes, "scenes")
    table, captions = of_methods(ident.table, methods), ident.captions
    groups = top_k_groups(table, k)
    grid = patch_grid(vlm)
    deltas = {}
    if occlusion and grid is not None:
        wanted: dict = {}
        for (image, noun, _), group in groups:
            if objects.boxes_for(scenes[image], noun):
                wanted.setdefault((image, noun), []).append(np.array(group[["layer", "unit"]], dtype=np.int64))
        units_by_object = {key: np.unique(np.concatenate(parts), axis=0) for key, parts in wanted.items()}
        deltas = {key: (units_by_object[key], delta) for key, delta in
                  occlusion_deltas(vlm, scenes, ident, units_by_object, batch_size).items()}
    extremes = image_unit_scores(captions)                          # (B, L, F) twice
    labelled = presence_source(scenes) == "labels"
    rows = []
    for (image, noun, method), group in groups:
        units = np.array(group[["layer", "unit"]], dtype=np.int64)
        polarity = unit_polarity(group)
        contains = np.array([objects.contains(s, noun) if labelled else noun in c.nouns
                             for s, c in zip(scenes, captions)])
        per_unit = signed_image_scores(extremes, units, polarity)    # (B, K)
        row = dict(image=image, noun=noun, method=method, in_scene=bool(contains[image]),
                   auroc=float(np.nanmean([auroc(u[contains], u[~contains]) for u in per_unit.T]))
                   if contains.any() and not contains.all() else float("nan"))
        scene = scenes[image]
        boxes = objects.boxes_for(scene, noun)
        if grid is not None and boxes:
            size = (scene.image.height, scene.image.width)
            maps = unit_maps(vlm, captions[image].activations, units, polarity)
            row.update(box_scores(maps.mean(0), size, boxes))
            row.update(_suffixed(box_scores(centred(maps).mean(0), size, boxes), suffix="_centred"))
            if (image, noun) in deltas:
                union, delta = deltas[(image, noun)]
                change = delta[_rows_of(union, units)] * polarity.reshape(-1, 1)       # (K, I)
                mean = change.mean(0).reshape(grid)
                row.update(_suffixed(box_scores(mean, size, boxes), prefix="occlusion_"),
                           occlusion_signed_in_box=signed_share_in_box(mean, size, boxes))
        rows.append(row)
    frame = pd.DataFrame(rows)
    if len(frame) and frame.duplicated(["image", "noun", "method"]).any():
        # the selection null's draws: their mean, one row per noun instance as for every method
        frame = frame.groupby(["image", "noun", "method"], sort=False, as_index=False).mean()
        frame["in_scene"] = frame["in_scene"].astype(bool)
    return frame


def _rows_of(union: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Index into the rows of ``union`` (``Int[ndarray, "M 2"]``, unique) of each of ``units``."""
    where = {(int(layer), int(unit)): i for i, (layer, unit) in enumerate(union)}
    return np.array([where[(int(layer), int(unit))] for layer, unit in units], dtype=np.int64)


def presence_source(samples) -> str:
    """``"labels"`` when any sample lists its objects (scenes, an annotated folder), else
    ``"captions"``: selectivity then takes "the image contains the noun" from the model's caption."""
    return "labels" if any(getattr(s, "nouns", None) for s in samples) else "captions"


def unit_polarity(rows: pd.DataFrame) -> np.ndarray:
    """``Int[ndarray, "N"]``: the rows' ``polarity`` column, or all ``+1`` for tables made
    before it existed."""
    if "polarity" in rows:
        return rows["polarity"].to_numpy(dtype=np.int64)
    return np.ones(len(rows), dtype=np.int64)

