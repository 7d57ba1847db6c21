"""Occlusion: paint an object out of its image and read what changes, patch by patch.

A unit's raw activation map over the image patches may be nearly flat (a pretrained LM's
top units: patch-to-patch std / mean ≈ 0.4), so where it is highest says little about
where the object is. Painting the object's box(es) over with the scene's background and
subtracting the activations of the painted image from the original ones leaves, per patch,
the part of the activation the object is responsible for:
``p · (a_original − a_occluded)``. Its box metrics (mass in box, pointing) are computed in
:mod:`~mmneurons_utils.properties.specificity`.

* **Fill colour**: where the image has a flat background — the most common colour of the
  pixels outside every box covers at least a quarter of them (an embedded scene, also when
  exported to a folder) — that colour, exactly the colour the scene's canvas was filled with,
  found without importing the scene generator; for any other image (a photo), its mean colour.
* **Prefill only**: the image-token activations of a causal LM depend on the prompt and the
  image only, not on generated tokens, so one forward of the prompt (no generation) gives
  them; occluded images go through in batches.
* **Stages** (:func:`stage_states`): the hidden state at the image positions after the vision
  tower (the projector's input: the tower features the language model is given), after the
  projector, and after chosen decoder layers of the language model. Their per-patch L2
  change under occlusion is what :func:`~mmneurons_utils.properties.locality.occlusion_locality`
  measures.

Shapes: ``L`` decoder layers, ``I`` image tokens, ``F`` units per layer, ``N`` units, ``D``
hidden size of a stage.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..model import architectures as A
from ..model.capture import record_activations
from ..model.pixels import as_viewed
from ..model.trace import Trace, TraceDict
from ..data import objects

TOWER, PROJECTOR = "vision tower", "projector"


FLAT_BACKGROUND = 0.25   # the most common colour outside the boxes is "the background" above this share


def fill_colour(sample) -> tuple[int, int, int]:
    """The RGB colour an occluded box is painted with (see the module doc): the background where
    the image has a flat one — the most common colour outside every box, when it covers at least
    a quarter of those pixels (the scenes, and the same scenes exported to a folder) — else the
    image's mean colour (a photo)."""
    pixels = np.asarray(as_viewed(sample.image))
    outside = ~_mask(pixels.shape[:2], [box for _, box in getattr(sample, "boxes", ()) or ()])
    if outside.any():
        colours, counts = np.unique(pixels[outside].reshape(-1, 3), axis=0, return_counts=True)
        if counts.max() >= FLAT_BACKGROUND * outside.sum():
            return tuple(int(c) for c in colours[int(np.argmax(counts))])
    return tuple(int(round(c)) for c in pixels.reshape(-1, 3).mean(0))


def occlude(sample, boxes: Sequence[tuple[int, int, int, int]],
            fill: tuple[int, int, int] | None = None) -> Image.Image:
    """``sample.image`` (RGB, as a viewer shows it) with ``boxes`` (``x0, y0, x1, y1``, end
    exclusive) painted with ``fill`` (default :func:`fill_colour`)."""
    pixels = np.array(as_viewed(sample.image))
    pixels[_mask(pixels.shape[:2], boxes)] = fill if fill is not None else fill_colour(sample)
    return Image.fromarray(pixels)


def _mask(size: tuple[int, int], boxes) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(int(y0), 0):int(y1), max(int(x0), 0):int(x1)] = True
    return mask


@torch.no_grad()
def prefill_image_activations(vlm, images: Sequence[Image.Image], activation: str = "down_proj_input",
                              batch_size: int = 16) -> Iterator[tuple[int, torch.Tensor]]:
    """``(index, Float[Tensor, "L I F"])`` per image: the units' activations at its image tokens
    from one forward of the prompt (no generation), ``batch_size`` images a forward. Equal to
    ``describe(..., activation=activation, image_activations=True)``'s ``activations.image``."""
    images = list(images)
    for start in range(0, len(images), batch_size):
        enc = vlm.inputs(images[start:start + batch_size])
        with record_activations(vlm, vlm.image_token_mask(enc["input_ids"]), activation) as recording:
            vlm.model(**enc, use_cache=False)
        for row in range(enc["input_ids"].shape[0]):
            yield start + row, recording.for_row(row, 0, activation).image


def occlusion_deltas(vlm, samples, ident, units_by_object: dict, batch_size: int = 16,
                     fill: tuple[int, int, int] | None = None) -> dict:
    """``(image, noun)`` → ``Float[ndarray, "N I"]``: ``a_original − a_occluded`` of the units
    ``units_by_object[(image, noun)]`` (``Int[ndarray, "N 2"]`` of ``(layer, unit)``) at each
    image token, the occluded image being ``samples[image]`` with the noun's boxes painted
    (:func:`occlude`). ``ident``: the :class:`~mmneurons_utils.method.identification.
    Identification` of ``samples``' images; its captions' ``activations.image`` are the originals
    (``image_activations=True``). Keys without boxes are left out.
    """
    captions = ident.captions
    keys, images = [], []
    for image, noun in units_by_object:
        boxes = objects.boxes_for(samples[image], noun)
        if boxes:
            keys.append((image, noun))
            images.append(occlude(samples[image], boxes, fill))
    for image, _ in keys:
        if captions[image].activations is None or captions[image].activations.image is None:
            raise ValueError("activations lack image positions: describe the images with "
                             "activation='down_proj_input', image_activations=True")
    kinds = {captions[image].activations.kind for image, _ in keys}
    out = {}
    for kind in sorted(kinds):
        chosen = [i for i, (image, _) in enumerate(keys) if captions[image].activations.kind == kind]
        for i, occluded in prefill_image_activations(vlm, [images[j] for j in chosen], kind, batch_size):
            key = keys[chosen[i]]
            units = torch.as_tensor(np.array(units_by_object[key], dtype=np.int64).reshape(-1, 2))
            original = captions[key[0]].activations.image
            delta = original[units[:, 0], :, units[:, 1]].float() - occluded[units[:, 0], :, units[:, 1]].float()
            out[key] = delta.cpu().numpy()
    return out


def stage_names(vlm, layers: Sequence[int]) -> list[str]:
    """The stages :func:`stage_states` reads, in the order the image passes them."""
    return [TOWER, PROJECTOR] + [f"LM layer {int(layer)}" for layer in layers]


@torch.no_grad()
def stage_states(vlm, images: Sequence[Image.Image], layers: Sequence[int],
                 batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Per image, stage name (:func:`stage_names`) → ``Float[Tensor, "I D"]`` (float32, CPU): the
    hidden state at its ``I`` image tokens after the vision tower (the projector's input, a
    leading CLS row dropped when the tower passes one), after the projector, and after each
    decoder layer of ``layers``. One prefill forward per ``batch_size`` images."""
    n_tokens = vlm.n_image_tokens
    projector = A.resolve(vlm.model, vlm.arch.image_projector)
    modules = {int(layer): vlm.layers[int(layer)] for layer in layers}
    images, out = list(images), []
    for start in range(0, len(images), batch_size):
        enc = vlm.inputs(images[start:start + batch_size])
        batch = enc["input_ids"].shape[0]
        mask = vlm.image_token_mask(enc["input_ids"])
        with Trace(projector, retain_input=True, retain_output=True) as proj, \
                TraceDict(modules, retain_output=True) as lm:
            vlm.model(**enc, use_cache=False)
        tower = _image_rows(proj.input, batch, n_tokens, "the vision tower's output")
        projected = _image_rows(proj.output, batch, n_tokens, "the projector's output")
        hidden = {layer: (t.output[0] if isinstance(t.output, tuple) else t.output) for layer, t in lm.items()}
        for row in range(batch):
            states = {TOWER: tower[row], PROJECTOR: projected[row]}
            for layer, h in hidden.items():
                states[f"LM layer {layer}"] = h[row, mask[row].to(h.device)].float().cpu()
            out.append(states)
    return out


def _image_rows(x: torch.Tensor, batch: int, n_tokens: int, what: str) -> torch.Tensor:
    """``Float[Tensor, "B I D"]`` (float32, CPU) from a projector input / output of ``batch`` images."""
    x = x.reshape(batch, -1, x.shape[-1]).float().cpu()
    if x.shape[1] == n_tokens + 1:    # a tower that passes its CLS token on ("full" strategy)
        x = x[:, 1:]
    if x.shape[1] != n_tokens:
        raise ValueError(f"{what} has {x.shape[1]} rows per image, not the {n_tokens} image tokens "
                         "of a patch grid")
    return x
