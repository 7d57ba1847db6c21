"""One entry point for every editor on the same request: :func:`edit_with`.

A request is a source noun, a target noun, the edit images (their captions say the source),
the unrelated images whose captions must stay put; every editor returns an
:class:`EditorEdit` (an :class:`~.editing.Edit`: ``apply`` / ``undo`` bit for bit, ``settle``,
``evaluate``) with ``params_changed`` (weight entries that differ once applied) and
``params_trained`` (the editor's degrees of freedom).

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
  (:func:`key_covariance`). ``params_trained = D`` (δ; ``k*`` and ``C`` are not learned).

Shapes: ``D`` model width, ``F`` units per layer (``d_ff``), ``B`` images, ``T`` positions.
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch

from ..model import architectures as A
from ..model.cache import cache_dir, weights_hash
from ..model.offload import weight
from ..model.teacher_forcing import append_captions
from ..model.trace import trace_down_proj
from ..store.results import atomic_write
from .ablation import column_snapshot
from .edit_inputs import check_edit, choose_units, source_steps, target_token
from .edit_learning import UNIT_CHOICES, EditBatch, EditConfig, EditInputError, LearnedDeltas, fit_edit
from .editing import Edit, edit_token

WEIGHT_EDITORS = ("ft", "lora", "rome")
EDITORS = tuple(UNIT_CHOICES) + WEIGHT_EDITORS
LORA_RANK = 4
ROME_CLAMP = 4.0
ROME_LR = 0.5        # ROME's v_lr: δ lives in the residual stream, not on a unit's column
RIDGE = 1e-3


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
              covariance_images: Sequence = (), progress: bool = False, **settings) -> EditorEdit:
    """Edit ``images`` (captions saying ``source``) to say ``target`` with ``method`` (one of
    :data:`EDITORS`; see the module doc), leaving ``unrelated`` alone. ``config`` / ``settings``:
    an :class:`~.edit_learning.EditConfig` and its fields (``k``: units of the unit editors, and
    the units that pick the weight editors' layer). ``covariance_images``: ``rome``'s key pool.

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
                          progress=progress)
        return EditorEdit.of(edit, method=method, params_trained=edit.deltas.numel(),
                             seconds=time.perf_counter() - start)
    if method == "rome" and not len(covariance_images):
        raise EditInputError("rome needs covariance_images: a pool of captioned images for the key covariance")
    check_edit(vlm, images, source, target, None, config)
    target_id = target_token(vlm, target)
    captions = vlm.describe(images, max_new_tokens=config.max_new_tokens, activation="down_proj_input")
    steps = source_steps(vlm, captions, source)
    layer = edit_layer(vlm, captions, steps, captions[0].token_ids[steps[0]], config.k)
    d_model, d_ff = weight(vlm.down_proj(layer)).shape
    units = np.array([(layer, i) for i in range(d_ff)], dtype=np.int64)
    label = f"{method} {source}→{target}"
    if method == "ft":   # the same learner as ours, on every unit of the layer
        edit = edit_token(vlm, images, source, target, units=units, unrelated=unrelated,
                          config=config, captions=captions, progress=progress)
        return EditorEdit.of(edit, method=method, layer=layer, params_trained=d_model * d_ff,
                             seconds=time.perf_counter() - start)
    others = vlm.describe(unrelated, max_new_tokens=config.max_new_tokens) if unrelated else []
    batch = EditBatch.build(vlm, images, captions, steps, unrelated, others)
    if method == "lora":
        delta, history, converged = lora_delta(vlm, batch, layer, target_id, config, progress, label)
        trained = LORA_RANK * (d_model + d_ff)
    else:
        cov = key_covariance(vlm, layer, covariance_images, config.max_new_tokens)
        delta, history, converged = rome_delta(vlm, batch, layer, target_id, cov, config, progress, label)
        trained = d_model
    originals = column_snapshot(vlm, units)
    w_norm = float(weight(vlm.down_proj(layer)).detach().float().norm())
    norm = float(delta.norm())
    learned = LearnedDeltas(units, delta.T.contiguous().cpu(), originals, converged,
                            history[-1]["margin"] if history else float("-inf"), history, norm,
                            norm / max(w_norm, 1e-30))
    edit = Edit.learned(vlm, source, target, target_id, learned, [c.text for c in captions],
                        unit_choice=method)
    edit = EditorEdit.of(edit, method=method, layer=layer, params_trained=trained,
                         seconds=time.perf_counter() - start)
    try:
        return edit.settle(images, config.keep_failed, config.max_new_tokens)
    except BaseException:     # applied but never handed back: take it out again
        edit.undo()
        raise


@contextmanager
def _frozen(vlm):
    """Every model parameter without gradient inside the block; flags restored however it ends."""
    flags = [p.requires_grad for p in vlm.model.parameters()]
    try:
        for p in vlm.model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(vlm.model.parameters(), flags):
            p.requires_grad_(flag)


def _module_name(vlm, module) -> str:
    return next(name for name, m in vlm.model.named_modules() if m is module)


def lora_delta(vlm, batch: EditBatch, layer: int, target_id: int, config: EditConfig,
               progress: bool = False, label: str = "lora") -> tuple[torch.Tensor, list[dict], bool]:
    """``(ΔW, history, converged)``: train a rank-:data:`LORA_RANK` peft adapter on ``down_proj`` of
    ``layer``; ``ΔW`` (``Float[Tensor, "D F"]``) is its merged delta. The adapter module is put in
    for training and the original module object put back afterwards, also on an exception."""
    from peft import LoraConfig, inject_adapter_in_model

    module = vlm.down_proj(layer)
    name = _module_name(vlm, module)
    parent_name, child = name.rsplit(".", 1)
    parent = A.resolve(vlm.model, parent_name)
    w_norm2 = float(weight(module).detach().float().pow(2).sum())
    had_config = hasattr(vlm.model, "peft_config")
    with _frozen(vlm), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)                     # lora_A's initialisation
        with torch.no_grad():
            clean = torch.log_softmax(batch.logits(vlm), -1)
        try:
            inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0,
                                               target_modules=[name]), vlm.model)
            adapter = getattr(parent, child)
            params = [p for n, p in adapter.named_parameters() if "lora_" in n]
            for p in params:
                p.requires_grad_(True)
            delta_sq = lambda: adapter.get_delta_weight("default").float().pow(2).sum() / w_norm2
            history, converged = fit_edit(vlm, batch, params, delta_sq, target_id, config, progress,
                                          label, clean)
            with torch.no_grad():
                delta = adapter.get_delta_weight("default").detach().float().clone()
        finally:
            setattr(parent, child, module)                # the adapter is gone
            if not had_config and hasattr(vlm.model, "peft_config"):
                del vlm.model.peft_config
    return delta, history, converged


def rome_delta(vlm, batch: EditBatch, layer: int, target_id: int, cov: torch.Tensor,
               config: EditConfig, progress: bool = False, label: str = "rome"
               ) -> tuple[torch.Tensor, list[dict], bool]:
    """``(ΔW, history, converged)``: ROME's rank-one update ``δ uᵀ / (uᵀ k*)`` (``u = C⁻¹ k*``,
    ``Float[Tensor, "D F"]``) of ``down_proj`` of ``layer``; ``cov``: ``Float[Tensor, "F F"]``."""
    module = vlm.down_proj(layer)
    w = weight(module).detach().float()                                          # (D, F)
    positions = batch.source_steps + batch.prompt_len - 1                        # (B_edit,)
    with torch.no_grad(), trace_down_proj(vlm, [layer], retain_input=True) as traces:
        clean = torch.log_softmax(batch.logits(vlm), -1)
        keys = traces[layer].input[batch.rows, positions.to(traces[layer].input.device)].float()
    key = keys.mean(0).to(w.device)                                              # (F,)
    v0_norm = float((w @ key).norm())
    delta = torch.zeros(w.shape[0], device=vlm.device, requires_grad=True)       # (D,)
    mask = torch.zeros(batch.full["input_ids"].shape + (1,), device=vlm.device)  # (B, T, 1)
    mask[batch.rows, positions] = 1.0

    def add(output, x, _layer):
        return output + (mask.to(output.device) * delta.to(output.device)).to(output.dtype)

    def clamp():
        with torch.no_grad():
            limit = ROME_CLAMP * v0_norm
            if float(delta.norm()) > limit:
                delta.mul_(limit / float(delta.norm()))

    config = EditConfig.of(config, lr=ROME_LR)
    with _frozen(vlm), trace_down_proj(vlm, [layer], edit_output=add):
        penalty = lambda: delta.pow(2).sum() / max(v0_norm, 1e-12) ** 2   # noqa: E731
        history, converged = fit_edit(vlm, batch, [delta], penalty, target_id, config, progress,
                                      label, clean, project=clamp)
    u = torch.linalg.solve(cov.to(w.device).double(), key.double())              # C⁻¹ k*
    update = torch.outer(delta.detach().double().to(w.device), u) / torch.dot(u, key.double())
    return update.float(), history, converged


# --- ROME's key covariance --------------------------------------------------------------------
def _images_digest(images: Sequence) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for image in images:
        digest.update(f"{image.size}{image.mode}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


@torch.no_grad()
def key_covariance(vlm, layer: int, images: Sequence, max_new_tokens: int = 20, batch_size: int = 16,
                   use_cache: bool = True) -> torch.Tensor:
    """``Float[Tensor, "F F"]``: ``E[k kᵀ]`` of ``down_proj``'s input at ``layer`` over every
    non-padding position of prompt + greedy caption of ``images`` (``+ 10⁻³ · mean diagonal ·
    I``). Cached under ``cache_dir()/rome`` keyed by :func:`~mmneurons_utils.model.cache.weights_hash`,
    the layer and the images' bytes; the cached file also holds ``n_keys``."""
    images = list(images)
    path = None
    if use_cache:
        key = hashlib.blake2b(f"{weights_hash(vlm)}|{layer}|{_images_digest(images)}|{max_new_tokens}"
                              f"|rome-cov".encode(), digest_size=16).hexdigest()
        path = cache_dir() / "rome" / f"{key}.pt"
        if path.is_file():
            return torch.load(path, map_location="cpu")["cov"]
    total, n = None, 0
    for start in range(0, len(images), batch_size):
        part = images[start:start + batch_size]
        ids = [c.token_ids for c in vlm.describe(part, max_new_tokens=max_new_tokens)]
        full, _, _ = append_captions(vlm.inputs(part), ids, vlm.tokenizer.pad_token_id or 0)
        with trace_down_proj(vlm, [layer], retain_input=True) as traces:
            vlm.model(**full)
        x = traces[layer].input.float().cpu()                                  # (B, T, F)
        x = x[full["attention_mask"].bool().cpu()].double()                    # (N, F)
        total = x.T @ x if total is None else total + x.T @ x
        n += len(x)
    cov = total / max(n, 1)
    cov = (cov + RIDGE * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)).float()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save({"cov": cov, "n_keys": n, "n_images": len(images)}, tmp))
    return cov
