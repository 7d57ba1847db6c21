"""Dataset examples: the images on which each unit fires most, at both ends.

A unit's **image score** on one image is read over that image's tokens (the ``down_proj``
input at the image-token positions of the prefill, ``Caption.activations.image``):
``max_j a_j`` for the top end and ``min_j a_j`` for the bottom end. A unit of polarity
``−1`` (it writes its noun through ``−W_out[:, i]``; see :mod:`mmneurons_utils.method.scoring`)
signals with negative activations, so its examples are the bottom end, read as
``max_j (−a_j) = −min_j a_j``.

For every one of the ``L × F`` units the ``E`` best images at each end are kept by a
**streaming top-k**: each batch is described (``activation="down_proj_input",
image_activations=True``), reduced to ``Float[Tensor, "L F B"]`` of max and min, concatenated
with the running ``Float[Tensor, "L F E"]`` state along the last axis and cut back to ``E`` with
``topk`` (values and global image indices). The state is ``L × F × E × 2`` values plus as
many indices, whatever the number of images; only one batch's activations live at once.

The result is cached on disk (``$MMNEURONS_CACHE/examples/``, like the neuron vocabulary)
when the caller names the image set with a ``description`` (e.g. ``"scenes n=256 seed=0"``):
the key hashes the weights (``W_U`` and every ``W_out``, as
:func:`~mmneurons_utils.model.cache.weights_hash` does), the description and ``E``. Without a
description nothing is cached (the images alone are not a stable key).

Images an :class:`~mmneurons_utils.method.identification.Identification` holds with their
image activations need no pass at all: :func:`identification_examples` reads them from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..store.provenance import image_hash, image_hashes, images_digest
from ..store.results import atomic_write
from ..properties.specificity import image_unit_scores
from ..model.cache import cache_dir, weights_hash


@dataclass
class UnitExamples:
    """Each unit's ``E`` top images at both ends of its image score.

    ``high_values`` / ``high_images``: ``Float`` / ``Int[Tensor, "L F E"]``, the largest
    ``max_j a_j`` and their image indices, best first. ``low_values`` / ``low_images``: the
    smallest ``min_j a_j`` (most negative first) and their images. Slots not filled (fewer
    than ``E`` images seen) hold image ``-1`` and value ``∓inf``.
    """

    high_values: torch.Tensor
    high_images: torch.Tensor
    low_values: torch.Tensor
    low_images: torch.Tensor
    description: str | None = None
    n_images: int = 0

    @property
    def examples(self) -> int:
        return int(self.high_values.shape[-1])

    def top(self, layer: int, unit: int, polarity: int = 1) -> tuple[list[int], list[float]]:
        """``(image indices, scores)`` of unit ``(layer, unit)`` in the direction ``polarity``,
        best first: scores are ``max p · a`` over the image's tokens."""
        if polarity >= 0:
            images, scores = self.high_images[layer, unit], self.high_values[layer, unit]
        else:
            images, scores = self.low_images[layer, unit], -self.low_values[layer, unit]
        keep = images >= 0
        return images[keep].tolist(), scores[keep].tolist()

    def images_of(self, units, polarity) -> np.ndarray:
        """``Int[ndarray, "N E"]``: the top images of ``units`` (``Int[ndarray, "N 2"]``), each
        in its ``polarity`` (``Int[ndarray, "N"]`` of ±1); ``-1`` where fewer than ``E`` images
        were seen."""
        units = np.array(units, dtype=np.int64).reshape(-1, 2)     # a writable copy
        signs = np.array(polarity, dtype=np.int64).reshape(-1)
        layer, unit = torch.as_tensor(units[:, 0]), torch.as_tensor(units[:, 1])
        high, low = self.high_images[layer, unit].numpy(), self.low_images[layer, unit].numpy()
        return np.where(signs[:, None] >= 0, high, low)

    def state_dict(self) -> dict:
        return dict(high_values=self.high_values, high_images=self.high_images,
                    low_values=self.low_values, low_images=self.low_images,
                    description=self.description, n_images=self.n_images)


class ExampleStream:
    """The running top-``E`` of every unit; feed it captions batch by batch with :meth:`add`."""

    def __init__(self, n_layers: int, d_ff: int, examples: int = 8):
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
            raise ValueError(f"examples must be a positive integer, got {examples!r}")
        shape = (n_layers, d_ff, examples)
        self.high_values = torch.full(shape, -torch.inf)
        self.low_values = torch.full(shape, torch.inf)
        self.high_images = torch.full(shape, -1, dtype=torch.int64)
        self.low_images = torch.full(shape, -1, dtype=torch.int64)
        self.n_images = 0

    @torch.no_grad()
    def add(self, captions: Sequence, indices: Sequence[int] | None = None) -> None:
        """Merge a batch: ``captions`` made with image activations; ``indices`` their global
        image numbers (default: the next ``len(captions)`` after those already added)."""
        if not captions:
            return
        if indices is None:
            indices = range(self.n_images, self.n_images + len(captions))
        indices = torch.as_tensor(list(indices), dtype=torch.int64)
        if any(c.activations is None or c.activations.image is None for c in captions):
            raise ValueError("captions lack image activations: describe the images with "
                             "activation='down_proj_input', image_activations=True")
        high, low = (x.permute(1, 2, 0) for x in image_unit_scores(captions))  # (L, F, B) each
        batch_images = indices.expand(*high.shape[:2], len(indices))           # (L, F, B)
        self.high_values, self.high_images = _merge(self.high_values, self.high_images,
                                                    high, batch_images, largest=True)
        self.low_values, self.low_images = _merge(self.low_values, self.low_images,
                                                  low, batch_images, largest=False)
        self.n_images += len(captions)

    def result(self, description: str | None = None) -> UnitExamples:
        return UnitExamples(self.high_values, self.high_images, self.low_values, self.low_images,
                            description=description, n_images=self.n_images)


def _merge(values, images, new_values, new_images, largest: bool):
    """Top-``E`` along the last axis of ``[values | new_values]`` with their image indices."""
    merged = torch.cat([values, new_values], -1)
    top, where = merged.topk(values.shape[-1], dim=-1, largest=largest, sorted=True)
    return top, torch.cat([images, new_images], -1).gather(-1, where)


def examples_key(vlm, description: str, examples: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{weights_hash(vlm)}|{description}|{examples}|image-extremes".encode())
    return digest.hexdigest()


def dataset_examples(vlm, images: Sequence, examples: int = 8, batch_size: int = 16,
                     description: str | None = None, use_cache: bool = True,
                     progress: bool = False) -> UnitExamples:
    """Every unit's ``examples`` top images at both ends over ``images`` (see the module doc).

    ``description`` names the image set (``"scenes n=256 seed=0"``); with it the result is
    read from / written to the disk cache, keyed by the weights, the description and
    ``examples``. Memory: one batch of activations plus the ``L × F × E`` state.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    stream = ExampleStream(vlm.n_layers, vlm.d_ff, examples)
    path = None
    images = list(images)
    if description is not None and use_cache:
        # keyed by the images' contents too: changed images under the same description recompute
        contents = images_digest(image_hashes(map(str, range(len(images))), images))
        path = cache_dir() / "examples" / f"{examples_key(vlm, f'{description}|{contents}', examples)}.pt"
        cached = _load_cache(path)
        if cached is not None:
            return UnitExamples(**cached)
    for start in tqdm(range(0, len(images), batch_size), desc="dataset examples",
                      disable=not progress):
        batch = images[start:start + batch_size]
        # one token is enough: the image positions are all in the prefill
        captions = vlm.describe(batch, max_new_tokens=1, batch_size=len(batch),
                                activation="down_proj_input", image_activations=True)
        stream.add(captions, range(start, start + len(batch)))
    result = stream.result(description)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(result.state_dict(), tmp))
    return result


def identification_examples(ident, examples: int = 8) -> UnitExamples:
    """Every unit's ``examples`` top images at both ends over the images of ``ident`` (an
    :class:`~mmneurons_utils.method.identification.Identification` made with
    ``image_activations=True``), read from its captions' activations: no model pass. Equal to
    :func:`dataset_examples` of its images up to the numerics of the batch (its activations are
    those of the identification's generation)."""
    check_image_activations(ident)
    shape = ident.captions[0].activations.image.shape if ident.n_images else (0, 0, 0)
    stream = ExampleStream(int(shape[0]), int(shape[-1]), examples)
    stream.add(ident.captions)
    return stream.result(f"identification of {ident.n_images} images")


def check_image_activations(ident) -> None:
    """``ValueError`` unless every caption of ``ident`` holds activations at the image tokens."""
    if any(c.activations is None or c.activations.image is None for c in ident.captions):
        raise ValueError("this identification has no activations at the image tokens: identify "
                         "with image_activations=True")


def covered_images(ident, images: Sequence) -> int:
    """How many of ``images`` ``ident`` holds: ``ident.n_images``, its images being the first ones
    of ``images`` (checked by content hash when ``ident`` records them); ``ValueError`` when they
    are not, or ``ident`` lacks the image-token activations."""
    if ident is None:
        return 0
    n = ident.n_images
    if n > len(images):
        raise ValueError(f"the identification covers {n} images, only {len(images)} are given")
    check_image_activations(ident)
    hashes = ident.identity.get("images")
    if hashes is not None and [image_hash(image) for image in list(images[:n])] != list(hashes):
        raise ValueError(f"the identification's images are not the first {n} images given "
                         "(their contents differ)")
    return n


def _load_cache(path):
    """The cached state at ``path``, or ``None`` when there is none or it cannot be read (a
    damaged cache file is recomputed and replaced, never trusted)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu")
    except Exception:
        return None


def purity(examples: UnitExamples, units, polarity, contains) -> np.ndarray:
    """``Float[ndarray, "N"]``: share of each unit's top images (in its ``polarity``) for
    which ``contains`` (``Bool[ndarray, "B"]``, one per image of the set, e.g. "the caption
    says the noun") holds.

    ``units``: ``Int[ndarray, "N 2"]``; ``polarity``: ``Int[ndarray, "N"]`` of ±1. NaN for a
    unit with no images.
    """
    contains = np.asarray(contains, dtype=bool)
    top = examples.images_of(units, polarity)                       # (N, E), -1 = empty slot
    filled = top >= 0
    hits = np.where(filled, contains[np.clip(top, 0, None)], False)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits.sum(1) / filled.sum(1)
