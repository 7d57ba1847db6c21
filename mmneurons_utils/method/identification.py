"""The result of identification, handed to the interventions, the atlas and the widgets.

:class:`Identification` holds what one generation over a list of images gave: the long-form
table (the public ``find_neurons`` columns), the captions with their noun steps (and
activations), a stable key per image, and the settings of the run. Whatever takes it reads
the captions from it instead of captioning the images again. :func:`units_of` and
:func:`top_k_groups` read a table's units (the handoff to ablation and editing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd


@dataclass
class Identification:
    """``table``: one row per (image, noun, method, unit), ``image`` = the image's position;
    ``captions``: one ``Caption`` per image (``text``, ``token_ids``, ``noun_tokens`` with each
    noun's step, ``activations``); ``image_keys``: one stable name per image (a file name,
    ``scene-<seed>-<index>``, or ``image-<i>``); ``settings``: the run's model name, methods,
    ``top_k``, ``seed``, ``max_new_tokens`` and ``image_activations``.

    It unpacks as ``table, captions = find_neurons_by_method(...)``.
    """

    table: pd.DataFrame
    captions: list
    image_keys: list[str]
    settings: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.image_keys) != len(self.captions):
            raise ValueError(f"{len(self.image_keys)} image keys for {len(self.captions)} captions")

    def __iter__(self) -> Iterator:
        return iter((self.table, self.captions))

    def units_of(self, noun: str, k: int, image: int | None = None,
                 method: str = "contribution") -> np.ndarray:
        """``Int[ndarray, "K 2"]``: the table's top-``k`` units for ``noun`` (see
        :func:`~mmneurons_utils.method.identify.units_of`)."""
        return units_of(self.table, noun, k, image=image, method=method)


def units_of(table: pd.DataFrame, noun: str, k: int, image: int | None = None,
             method: str = "contribution") -> np.ndarray:
    """``Int[ndarray, "K 2"]``: the ``(layer, unit)`` of a ``find_neurons`` table's top-``k``
    rows for ``noun`` — the handoff from identification to ablation and editing.

    ``image``: one image's ranking (its ``image`` column value); ``None`` pools every image
    that says the noun, ranking the units by their summed score over those images (a unit
    outside an image's top ``top_k`` adds nothing there). Raises ``ValueError`` naming what
    the table holds when the noun / image / method is missing or holds fewer than ``k`` units.
    """
    rows = table[(table["noun"] == noun) & (table["method"] == method)]
    if image is not None:
        rows = rows[rows["image"] == image]
    if rows.empty:
        where = "" if image is None else f" of image {image}"
        said = sorted(table.loc[table["method"] == method, "noun"].unique()) if image is None else \
            sorted(table.loc[(table["method"] == method) & (table["image"] == image), "noun"].unique())
        raise ValueError(f"the table has no {method!r} rows for {noun!r}{where}; its nouns there: "
                         f"{', '.join(said) or '(none)'}")
    if image is not None:
        ranked = rows.sort_values("rank")[["layer", "unit"]].to_numpy()
    else:
        summed = rows.groupby(["layer", "unit"], sort=True)["score"].sum()
        order = np.lexsort((summed.index.get_level_values(1), summed.index.get_level_values(0),
                            -summed.to_numpy()))                 # by score, ties by (layer, unit)
        ranked = np.asarray(summed.index.tolist(), dtype=np.int64)[order]
    if len(ranked) < k:
        raise ValueError(f"k={k} but the table holds {len(ranked)} {method!r} units for {noun!r}; "
                         "identify with a larger top_k")
    return np.asarray(ranked[:k], dtype=np.int64).reshape(-1, 2)


def top_k_groups(table: pd.DataFrame, k: int) -> list[tuple[tuple, pd.DataFrame]]:
    """``[((image, noun, method), rows), …]``: each group's top-``k`` rows of a
    ``find_neurons`` table, in rank order (groups in table order). A table with a ``draw``
    column (``selection_null`` rows) gives one group per draw, each under its 3-part key.

    Raises ``ValueError`` when the table holds fewer than ``k`` units per noun.
    """
    if len(table) and int(table["rank"].max()) + 1 < k:
        raise ValueError(f"k={k} but the table holds only the top {int(table['rank'].max()) + 1} "
                         "units per noun; identify with a larger top_k")
    top = table[table["rank"] < k]
    if "draw" in top:          # the selection-matched null: one group per draw, under the same key
        top = top.assign(draw=top["draw"].fillna(-1))
        groups = top.groupby(["image", "noun", "method", "draw"], sort=False)
        return [(key[:3], group.drop(columns="draw").sort_values("rank")) for key, group in groups]
    groups = top.groupby(["image", "noun", "method"], sort=False)
    return [(key, group.sort_values("rank")) for key, group in groups]
