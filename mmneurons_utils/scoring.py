"""Scores of every FFN unit for one generated token.

* **contribution** (the paper): ``s[l, i] = a[l, i] · (W_U[t] · W_out[l][:, i])`` —
  how much unit ``(l, i)`` writes token ``t``'s unembedding direction into the
  residual stream at the step that produces ``t``. Signed, no softmax, no final
  norm. Costs one mat-vec per layer (one row of ``W_U`` against ``W_out[l]``);
  the ``W_out·W_U`` product over the whole vocabulary is never formed.
* **gradient** (Schwettmann et al. 2023): ``a[l, i] · ∂p(t)/∂a[l, i]`` at the same
  position, through a full forward and backward pass.
* **random**: uniformly drawn units, seeded.

Shapes: ``L`` decoder layers, ``F`` units per layer (``d_ff``), ``D`` = d_model.
"""

from __future__ import annotations

import numpy as np
import torch

from .capture import append_captions


@torch.no_grad()
def unit_logit_weights(vlm, token_id) -> torch.Tensor:
    """``W_U[t] · W_out[l][:, i]`` for every unit (float32).

    ``token_id`` an int → ``Float[Tensor, "L F"]``; a list of ``T`` ids →
    ``Float[Tensor, "T L F"]`` (one ``(T, D) @ (D, F)`` matmul per layer).
    """
    w_u = vlm.lm_head.weight[token_id]                                  # (D,) or (T, D)
    return torch.stack([(w_u @ vlm.down_proj(layer).weight).float()    # → (F,) or (T, F)
                        for layer in range(vlm.n_layers)], dim=-2)


@torch.no_grad()
def contribution_scores(vlm, step_activations: torch.Tensor, token_id: int,
                        logit_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``Float[Tensor, "L F"]`` from the activations ``Float[Tensor, "L F"]`` at the token's step.

    ``logit_weights``: the token's ``unit_logit_weights`` if already computed (e.g. for
    many tokens at once); otherwise they are computed here.
    """
    if logit_weights is None:
        logit_weights = unit_logit_weights(vlm, token_id)
    return step_activations.float() * logit_weights


def gradient_scores(vlm, inputs: dict, generated_ids: list[int],
                    targets: list[tuple[int, int]]) -> list[torch.Tensor]:
    """Gradient × activation for each ``(step, token_id)`` of one image's caption.

    One forward pass over prompt + caption with gradients on, then one backward pass
    per target (``p(t)`` is the softmax probability at the position that produces
    step ``step``). ``inputs`` are ``vlm.inputs([image])``. Returns one
    ``Float[Tensor, "L F"]`` per target.
    """
    full, prompt_len, _ = append_captions(inputs, [generated_ids])
    acts: list[torch.Tensor] = []
    handles = [vlm.down_proj(layer).register_forward_pre_hook(lambda m, args: acts.append(args[0]))
               for layer in range(vlm.n_layers)]
    try:
        with torch.enable_grad():
            logits = vlm.model(**full).logits                          # (1, T, V)
            results = []
            for step, token_id in targets:
                pos = prompt_len - 1 + step
                prob = torch.softmax(logits[0, pos].float(), -1)[token_id]
                grads = torch.autograd.grad(prob, acts, retain_graph=True)
                results.append(torch.stack([(a[0, pos] * g[0, pos]).float().detach()
                                            for a, g in zip(acts, grads)]))
    finally:
        for handle in handles:
            handle.remove()
    return results


def random_units(n_layers: int, d_ff: int, k: int, seed) -> np.ndarray:
    """``Int[ndarray, "k 2"]``: ``k`` distinct ``(layer, unit)`` pairs, uniform, seeded
    (``seed``: an int or a sequence of ints, as numpy's ``default_rng`` takes)."""
    flat = np.random.default_rng(seed).choice(n_layers * d_ff, size=k, replace=False)
    return np.stack([flat // d_ff, flat % d_ff], 1)


def top_units(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest-scoring units of ``Float[Tensor, "L F"]``: ``(layer_unit[k, 2], score[k])``."""
    values, flat = scores.flatten().topk(k)
    d_ff = scores.shape[1]
    flat = flat.cpu().numpy()
    return np.stack([flat // d_ff, flat % d_ff], 1), values.cpu().numpy()


@torch.no_grad()
def unit_top_tokens(vlm, units: np.ndarray, k: int = 10) -> list[list[int]]:
    """Top-``k`` token ids of each unit's write vector (logit lens ``W_U · W_out[l][:, i]``).

    Only the asked-for columns are multiplied, once each: ``(V × D) @ (D × n_units_in_layer)``.
    """
    units, inverse = np.unique(np.asarray(units).reshape(-1, 2), axis=0, return_inverse=True)
    out: list[list[int]] = [[] for _ in range(len(units))]
    w_u = vlm.lm_head.weight
    for layer in np.unique(units[:, 0]):
        rows = np.flatnonzero(units[:, 0] == layer)
        columns = vlm.down_proj(int(layer)).weight[:, torch.as_tensor(units[rows, 1])]  # (D, n)
        ids = (w_u @ columns).topk(k, dim=0).indices.T.tolist()                         # (n, k)
        for row, token_ids in zip(rows, ids):
            out[row] = token_ids
    return [out[i] for i in inverse.reshape(-1)]


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ between two score maps of the same shape (ties broken by position)."""
    ranks = lambda x: x.flatten().argsort().argsort().double()
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Share of ``a``'s top-``k`` units that are also in ``b``'s top-``k``."""
    top = lambda x: set(x.flatten().topk(k).indices.tolist())
    return len(top(a) & top(b)) / k
