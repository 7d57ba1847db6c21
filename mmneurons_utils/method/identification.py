"""The result of identification, handed to the interventions, the atlas and the widgets.

:class:`Identification` holds what one generation over a list of images gave: the long-form
table (the public ``find_neurons`` columns), the captions with their noun steps (and
activations), a stable key per image, and the settings of the run. Whatever takes it reads
the captions from it instead of captioning the images again. :func:`units_of` and
:func:`top_k_groups` read a table's units (the handoff to ablation and editing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from ..model.capture import Activations
from ..model.nouns import NounToken
from ..model.vlm import Caption
from ..store.identifications import load_identification, save_identification


@dataclass
class Identification:
    """``table``: one row per (image, noun, method, unit), ``image`` = the image's position;
    ``captions``: one ``Caption`` per image (``text``, ``token_ids``, ``noun_tokens`` with each
    noun's step, ``activations``); ``image_keys``: one stable name per image (a file name,
    ``scene-<seed>-<index>``, or ``image-<i>``); ``settings``: the run's model name, methods,
    ``top_k``, ``seed``, ``max_new_tokens`` and ``image_activations``; ``identity``: what the
    numbers were computed from (``weights``: a hash of every weight, ``images``: one content
    hash per image), the key under which it is saved and found again.

    It unpacks as ``table, captions = find_neurons_by_method(...)``.
    """

    table: pd.DataFrame
    captions: list
    image_keys: list[str]
    settings: dict = field(default_factory=dict)
    identity: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.image_keys) != len(self.captions):
            raise ValueError(f"{len(self.image_keys)} image keys for {len(self.captions)} captions")

    def __iter__(self) -> Iterator:
        return iter((self.table, self.captions))

    def units(self, noun: str, k: int, image: int | None = None,
              method: str = "contribution") -> np.ndarray:
        """``Int[ndarray, "K 2"]``: the top-``k`` ``(layer, unit)`` for ``noun`` — one image's
        ranking (its position) or, with ``image=None``, pooled over the images that say it
        (see :func:`units_of`)."""
        return units_of(self.table, noun, k, image=image, method=method)

    units_of = units      # the earlier name

    @property
    def texts(self) -> list[str]:
        """The captions' texts, one per image."""
        return [caption.text for caption in self.captions]

    @property
    def n_images(self) -> int:
        return len(self.captions)

    def check_made_on(self, given: Sequence, what: str = "images") -> None:
        """``ValueError`` unless ``given`` (the images or scenes handed in beside it) are as many
        as the identification's images — the ones it was made on, in its order."""
        if len(given) != self.n_images:
            raise ValueError(f"{len(given)} {what} for an identification of {self.n_images} images; "
                             f"give the {what} it was made on (ident.subset(...) for some of them)")

    @property
    def top_k(self) -> int:
        """Units held per (image, noun, method): the run's ``top_k``, else the table's deepest
        rank + 1 (0 for a table without rows and no recorded ``top_k``)."""
        top_k = self.settings.get("top_k")
        if top_k is None:
            top_k = int(self.table["rank"].max()) + 1 if len(self.table) else 0
        return int(top_k)

    def subset(self, images: Sequence[int | str]) -> "Identification":
        """The identification of some of its images, in the order given (positions or image
        keys); the table's ``image`` column is renumbered to the new positions. Its rows are
        the full run's (random units and the null's draws keep the seeds of the images'
        positions there); ``ValueError`` naming the keys for an unknown image."""
        positions = []
        for image in images:
            if isinstance(image, str):
                if image not in self.image_keys:
                    raise ValueError(f"no image {image!r} here; its images: "
                                     f"{', '.join(self.image_keys[:8])}{' …' if self.n_images > 8 else ''}")
                positions.append(self.image_keys.index(image))
            elif isinstance(image, (int, np.integer)) and 0 <= int(image) < self.n_images:
                positions.append(int(image))
            else:
                raise ValueError(f"image {image!r}: give a position 0–{self.n_images - 1} or an image key")
        new = {old: new for new, old in enumerate(positions)}
        rows = self.table[self.table["image"].isin(new)]
        rows = rows.assign(image=rows["image"].map(new).astype(self.table["image"].dtype))
        order = np.argsort(rows["image"].to_numpy(), kind="stable")
        return Identification(rows.iloc[order].reset_index(drop=True),
                              [self.captions[p] for p in positions],
                              [self.image_keys[p] for p in positions], dict(self.settings),
                              dict(self.identity, images=[self.identity["images"][p] for p in positions])
                              if self.identity.get("images") else dict(self.identity))

    def save(self, folder: str | Path, key: dict | None = None) -> Path:
        """Write to ``folder``: table as parquet, activations bit for bit, a JSON sidecar with
        the captions, settings, identity and ``key`` (what :func:`~mmneurons_utils.method.
        identify.identify` finds it by; see :mod:`~mmneurons_utils.store.identifications`)."""
        tensors, captions = {}, []
        for i, caption in enumerate(self.captions):
            acts = caption.activations
            if acts is not None:
                tensors[f"steps.{i}"] = acts.steps
                if acts.image is not None:
                    tensors[f"image.{i}"] = acts.image
            captions.append(dict(text=caption.text, token_ids=[int(t) for t in caption.token_ids],
                                 tokens=list(caption.tokens), nouns=list(caption.nouns),
                                 noun_tokens=[[t.noun, int(t.step), int(t.token_id)]
                                              for t in caption.noun_tokens],
                                 activations=None if acts is None else acts.kind))
        return save_identification(folder, self.table, tensors,
                                   dict(image_keys=list(self.image_keys), settings=self.settings,
                                        identity=self.identity, key=key, captions=captions))

    @classmethod
    def load(cls, folder: str | Path) -> "Identification":
        """The identification saved in ``folder`` (``ResultFileError`` when it holds none)."""
        table, tensors, sidecar = load_identification(folder)
        captions = []
        for i, c in enumerate(sidecar["captions"]):
            acts = None if c["activations"] is None else \
                Activations(tensors[f"steps.{i}"], tensors.get(f"image.{i}"), c["activations"])
            captions.append(Caption(c["text"], c["token_ids"], c["tokens"], c["nouns"],
                                    [NounToken(n, s, t) for n, s, t in c["noun_tokens"]], acts))
        return cls(table, captions, sidecar["image_keys"], sidecar["settings"], sidecar["identity"])


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
