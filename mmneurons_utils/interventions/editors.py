"""One entry point for every editor on the same request: :func:`edit_with`.

A request is a source noun, a target noun, the edit images (their captions say the source),
the unrelated images whose captions must stay put; every editor returns an
:class:`EditorEdit` (an :class:`~.editing.Edit`: ``apply`` / ``undo`` bit for bit, its
``report``) with ``params_changed`` (weight entries that differ once applied) and
``params_trained`` (the editor's degrees of freedom). Every editor's learning is cached by its
settings (:data:`~.edit_learning.EDIT_CACHE`).

* ``contribution`` (ours), ``gradient``, ``gradient_image``, ``random``: additive deltas on the
  write vectors of ``k`` units chosen by that score (:func:`~.editing.edit_token`).
* ``ft``: the whole ``down_proj`` of the *edit layer* — the layer holding most of the top-``k``
  contribution units for the source (ties: the top unit's layer) — with the same loss,
  norm penalty and stopping rule (it is :func:`~.edit_learning.learn_deltas` on all ``F`` units
  of that layer). ``params_trained = D·F``.
* ``lora``: a rank-4 adapter (``peft``'s ``LoraConfig(r=4, lora_alpha=4)``, injected on that
  ``down_proj``, seeded) trained with the same loss (norm term on ``ΔW = B·A``) and stopping
  rule; afterwards the adapter module is taken out again and its merged weight
  ``W + ΔW`` (``get_delta_weight``, what peft's ``merge`` adds) is what ``apply`` writes and
  ``undo`` removes. ``params_trained = 4·(D + F)``.
* ``rome``: ROME's rank-one closed form on that ``down_proj`` (Meng et al. 2022, ``compute_u`` /
  ``compute_v``): key ``k*`` = the ``down_proj`` input at the source noun's step, mean over the
  edit images; ``δ`` added to ``down_proj``'s output at those steps is optimised with the same
  loss and stopping rule (norm term ``‖δ‖² / ‖W k*‖²``; Adam at ROME's ``v_lr`` = 0.5 and ‖δ‖
  clamped to 4‖W k*‖, as ROME does); then
  ``ΔW = δ (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)`` so that ``(W + ΔW) k* = W k* + δ``. ``C`` = the uncentred
  second moment of the layer's keys over every position of prompt + caption of
  ``covariance_images`` (``+ 10⁻³ · mean diagonal · I``), cached on disk
  (:func:`~.layer_editors.key_covariance`). ``params_trained = D`` (δ; ``k*`` and ``C`` are not learned).

Shapes: ``D`` model width, ``F`` units per layer (``d_ff``), ``B`` images, ``T`` positions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from ..model.offload import weight
from ..store.provenance import image_hash
from .ablation import column_snapshot
from .edit_inputs import check_edit, choose_units, source_steps, target_token
from .edit_learning import (EDIT_CACHE, UNIT_CHOICES, EditBatch, EditConfig, EditInputError,
                            LearnedDeltas, edit_key)
from .editing import Edit, accept, edit_token
from .layer_editors import LORA_RANK, key_covariance, lora_delta, rome_delta

WEIGHT_EDITORS = ("ft", "lora", "rome")
EDITORS = tuple(UNIT_CHOICES) + WEIGHT_EDITORS


@dataclass
class EditorEdit(Edit):
    """An :class:`~.editing.Edit` made by ``method`` (one of :data:`EDITORS`), with the layer it
    edits (weight editors), its degrees of freedom and the seconds it took to learn."""

    method: str = "contribution"
    layer: int | None = None
    params_trained: int = 0
    seconds: float = math.nan

    @property
    def params_changed(self) -> int:
        """Weight entries that differ once applied (non-zero entries of the deltas)."""
        return int((self.deltas != 0).sum())

    @classmethod
    def of(cls, edit: Edit, **extra) -> "EditorEdit":
        return cls(**{f.name: getattr(edit, f.name) for f in fields(Edit)}, **extra)


def edit_layer(vlm, captions, steps: Sequence[int], source_id: int, k: int) -> int:
    """The layer holding most of the top-``k`` contribution units for the source (ties: the
    layer of the highest-scoring unit); ``captions`` carry activations."""
    units = choose_units(vlm, captions, steps, source_id, k, "contribution")
    layers, counts = np.unique(units[:, 0], return_counts=True)
    best = layers[counts == counts.max()]
    return int(units[0, 0]) if units[0, 0] in best else int(best[0])


def edit_with(vlm, images: Sequence, source: str, target: str, method: str = "contribution",
              unrelated: Sequence = (), config: EditConfig | None = None,
              covariance_images: Sequence = (), progress: bool = False,
              captions: Sequence | None = None, unrelated_captions: Sequence | None = None,
              **settings) -> EditorEdit:
    """Edit ``images`` (captions saying ``source``) to say ``target`` with ``method`` (one of
    :data:`EDITORS`; see the module doc), leaving ``unrelated`` alone. ``config`` / ``settings``:
    an :class:`~.edit_learning.EditConfig` and its fields (``k``: units of the unit editors, and
    the units that pick the weight editors' layer). ``covariance_images``: ``rome``'s key pool.
    ``captions`` (with ``down_proj_input`` activations) / ``unrelated_captions``: the images'
    captions if already made.

    Returns the edit applied if it converged (or ``keep_failed``), like ``edit_token``.
    """
    if method not in EDITORS:
        raise EditInputError(f"method must be one of {', '.join(EDITORS)}, got {method!r}")
    # the weight editors pick their layer by the contribution units
    config = EditConfig.of(config, **settings, method="contribution" if method in WEIGHT_EDITORS else method)
    images, unrelated = list(images), list(unrelated)
    start = time.perf_counter()
    if method in UNIT_CHOICES:
        edit = edit_token(vlm, images, source, target, unrelated=unrelated, config=config,
                          progress=progress, captions=captions, unrelated_captions=unrelated_captions)
        return EditorEdit.of(edit, method=method, params_trained=edit.deltas.numel(),
                             seconds=time.perf_counter() - start)
    if method == "rome" and not len(covariance_images):
        raise EditInputError("rome needs covariance_images: a pool of captioned images for the key covariance")
    check_edit(vlm, images, source, target, None, config)
    target_id = target_token(vlm, target)
    if captions is None:
        captions = vlm.describe(images, max_new_tokens=config.max_new_tokens, activation="down_proj_input")
    captions = list(captions)
    steps = source_steps(vlm, captions, source)
    layer = edit_layer(vlm, captions, steps, captions[0].token_ids[steps[0]], config.k)
    d_model, d_ff = weight(vlm.down_proj(layer)).shape
    units = np.array([(layer, i) for i in range(d_ff)], dtype=np.int64)
    label = f"{method} {source}→{target}"
    if method == "ft":   # the same learner as ours, on every unit of the layer
        edit = edit_token(vlm, images, source, target, units=units, unrelated=unrelated,
                          config=config, captions=captions, progress=progress,
                          unrelated_captions=unrelated_captions)
        return EditorEdit.of(edit, method=method, layer=layer, params_trained=d_model * d_ff,
                             seconds=time.perf_counter() - start)
    others = (list(unrelated_captions) if unrelated_captions is not None else
              vlm.describe(unrelated, max_new_tokens=config.max_new_tokens) if unrelated else [])
    covariance = list(covariance_images) if method == "rome" else []
    key = edit_key(vlm, method, images, captions, steps, target_id, None, unrelated, others, config,
                   extra=[layer, [image_hash(im) for im in covariance]])

    def learn():
        batch = EditBatch.build(vlm, images, captions, steps, unrelated, others)
        if method == "lora":
            return lora_delta(vlm, batch, layer, target_id, config, progress, label)
        cov = key_covariance(vlm, layer, covariance, config.max_new_tokens)
        return rome_delta(vlm, batch, layer, target_id, cov, config, progress, label)

    delta, history, converged = EDIT_CACHE.get(key, learn)
    trained = LORA_RANK * (d_model + d_ff) if method == "lora" else d_model
    originals = column_snapshot(vlm, units)
    w_norm = float(weight(vlm.down_proj(layer)).detach().float().norm())
    norm = float(delta.norm())
    learned = LearnedDeltas(units, delta.T.contiguous().cpu(), originals, converged,
                            history[-1]["margin"] if history else float("-inf"), history, norm,
                            norm / max(w_norm, 1e-30))
    edit = Edit.learned(vlm, source, target, target_id, learned, captions, unit_choice=method,
                        images=images)
    edit = EditorEdit.of(edit, method=method, layer=layer, params_trained=trained,
                         seconds=time.perf_counter() - start)
    try:
        return accept(edit, images, config.keep_failed, config.max_new_tokens)
    except BaseException:     # applied but never handed back: take it out again
        edit.undo()
        raise
