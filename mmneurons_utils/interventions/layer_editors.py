"""The layer editors the field uses, as deltas on one layer's ``down_proj``: LoRA
(:func:`lora_delta`) and ROME's rank-one closed form (:func:`rome_delta`, with the key
covariance :func:`key_covariance`, cached on disk). :func:`~.editors.edit_with` turns a delta
into an :class:`~.editing.Edit`; its module doc gives each editor's definition.

Shapes: ``D`` model width, ``F`` units per layer (``d_ff``), ``B`` images, ``T`` positions.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Sequence

import torch

from ..model import architectures as A
from ..model.cache import cache_dir, weights_hash
from ..model.offload import weight
from ..model.teacher_forcing import append_captions
from ..model.trace import trace_down_proj
from ..store.provenance import image_hashes, images_digest
from ..store.results import atomic_write
from .edit_learning import EditBatch, EditConfig, fit_edit

LORA_RANK = 4
ROME_CLAMP = 4.0
ROME_LR = 0.5        # ROME's v_lr: δ lives in the residual stream, not on a unit's column
RIDGE = 1e-3


@contextmanager
def frozen(vlm):
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
    with frozen(vlm), torch.random.fork_rng(devices=[]):
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
    with frozen(vlm), trace_down_proj(vlm, [layer], edit_output=add):
        penalty = lambda: delta.pow(2).sum() / max(v0_norm, 1e-12) ** 2   # noqa: E731
        history, converged = fit_edit(vlm, batch, [delta], penalty, target_id, config, progress,
                                      label, clean, project=clamp)
    u = torch.linalg.solve(cov.to(w.device).double(), key.double())              # C⁻¹ k*
    update = torch.outer(delta.detach().double().to(w.device), u) / torch.dot(u, key.double())
    return update.float(), history, converged


# --- ROME's key covariance --------------------------------------------------------------------
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
        pixels = images_digest(image_hashes(map(str, range(len(images))), images))
        key = hashlib.blake2b(f"{weights_hash(vlm)}|{layer}|{pixels}|{max_new_tokens}"
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
