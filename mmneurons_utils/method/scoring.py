"""Scores of every FFN unit for one generated token.

* **contribution** (the paper): ``s[l, i] = a[l, i] · (W_U[t] · W_out[l][:, i])`` —
  how much unit ``(l, i)`` writes token ``t``'s unembedding direction into the
  residual stream at the step that produces ``t``. Signed, no softmax, no final
  norm. Costs one mat-vec per layer (one row of ``W_U`` against ``W_out[l]``);
  the ``W_out·W_U`` product over the whole vocabulary is never formed.
* **gradient** (gradient × activation *at the noun step*): ``a[l, i] · ∂p(t)/∂a[l, i]``
  at the position that produces ``t``, through a full forward and backward pass. A
  first-order estimate of what zeroing the unit there does to ``p(t)``, i.e. of the
  causal ablation itself.
* **gradient_image** (Schwettmann et al. 2023's placement): the attribution of the
  unit's activations *at the image-token positions* to the noun's log-probability,
  ``Σ_{j ∈ image} a[l, j, i] · ∂log p(t)/∂a[l, j, i]`` — how much the unit's reading of
  the image feeds the noun, wherever it is written.
* **random**: uniformly drawn units, seeded.

**Polarity.** ``a[l, i]`` has either sign (SwiGLU: ``act(gate)·up``), so a unit can write
``t`` through ``−W_out[l][:, i]``. A unit's polarity for ``t`` is ``p = sign(a[l, i])`` at
the step that produces ``t`` (``+1`` for 0); every reading of the unit (its top tokens,
maps, selectivity) is taken in that direction: ``p · (W_U · W_out[l][:, i])``, ``p · a``.

Shapes (the package's letters, see :mod:`mmneurons_utils`): ``L`` decoder layers, ``F``
units per layer (``d_ff``), ``D`` d_model, ``V`` vocabulary, ``T`` sequence positions,
``N`` rows of a list (units, token ids), ``K`` top-k.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model.offload import weight
from ..model.teacher_forcing import append_captions
from ..model.trace import trace_down_proj


@torch.no_grad()
def unit_logit_weights(vlm, token_id) -> torch.Tensor:
    """``W_U[t] · W_out[l][:, i]`` for every unit (float32).

    ``token_id`` an int → ``Float[Tensor, "L F"]``; a list of ``N`` ids →
    ``Float[Tensor, "N L F"]`` (one ``(N, D) @ (D, F)`` matmul per layer).
    """
    return direction_logit_weights(vlm, weight(vlm.lm_head)[token_id])   # (D,) or (N, D) rows


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


GRADIENT_PLACES = ("noun", "image")


def gradient_attributions(vlm, inputs: dict, generated_ids: list[int],
                          targets: list[tuple[int, int]],
                          places=GRADIENT_PLACES) -> dict[str, list[torch.Tensor]]:
    """Gradient attributions for each ``(step, token_id)`` of one image's caption, at each of
    ``places``: place → one ``Float[Tensor, "L F"]`` per target.

    ``"noun"``: gradient × activation ``a · ∂p(t)/∂a`` at the position that produces step
    ``step`` (``p`` the softmax probability). ``"image"``: ``Σ a · ∂log p(t)/∂a`` over the
    image-token positions (Schwettmann et al.'s placement). **One** forward pass over prompt +
    caption with gradients on, then one backward pass per target and place. ``inputs`` are
    ``vlm.inputs([image])``.
    """
    bad = [p for p in places if p not in GRADIENT_PLACES]
    if bad or not places:
        raise ValueError(f"at must be one of {', '.join(GRADIENT_PLACES)}, "
                         f"got {(bad or [tuple(places)])[0]!r}")
    full, prompt_len, _ = append_captions(inputs, [generated_ids])
    image = vlm.image_token_mask(full["input_ids"])[0] if "image" in places else None  # (T,)
    results: dict[str, list[torch.Tensor]] = {place: [] for place in places}
    with torch.enable_grad(), trace_down_proj(vlm, retain_input=True, detach=False) as traces:
        logits = vlm.model(**full).logits                              # (1, T, V)
    acts = [traces[layer].input for layer in range(vlm.n_layers)]      # (1, T, F) each, with graph
    with torch.enable_grad():
        for step, token_id in targets:
            pos = prompt_len - 1 + step
            if "noun" in places:
                prob = torch.softmax(logits[0, pos].float(), -1)[token_id]
                grads = torch.autograd.grad(prob, acts, retain_graph=True)
                results["noun"].append(torch.stack([(a[0, pos] * g[0, pos]).float().detach()
                                                    .to(vlm.device) for a, g in zip(acts, grads)]))
            if "image" in places:
                logp = torch.log_softmax(logits[0, pos].float(), -1)[token_id]
                grads = torch.autograd.grad(logp, acts, retain_graph=True)
                results["image"].append(torch.stack(
                    [(a[0, image.to(a.device)] * g[0, image.to(a.device)]).float().sum(0).detach()
                     .to(vlm.device) for a, g in zip(acts, grads)]))
    return results


def random_units(n_layers: int, d_ff: int, k: int, seed) -> np.ndarray:
    """``Int[ndarray, "K 2"]``: ``K`` = ``k`` distinct ``(layer, unit)`` pairs, uniform, seeded
    (``seed``: an int or a sequence of ints, as numpy's ``default_rng`` takes)."""
    flat = np.random.default_rng(seed).choice(n_layers * d_ff, size=k, replace=False)
    return np.stack([flat // d_ff, flat % d_ff], 1)


def top_units(scores: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest-scoring units of ``Float[Tensor, "L F"]``: ``(units, scores)``,
    ``Int[ndarray, "K 2"]`` ``(layer, unit)`` rows and ``Float[ndarray, "K"]``, best first."""
    values, flat = scores.flatten().topk(k)
    d_ff = scores.shape[1]
    flat = flat.cpu().numpy()
    return np.stack([flat // d_ff, flat % d_ff], 1), values.cpu().numpy()


def polarity(step_activations: torch.Tensor, units: np.ndarray) -> np.ndarray:
    """``Int[ndarray, "N"]``: ``sign(a[l, i])`` (``+1`` for 0) of ``units``
    (``Int[ndarray, "N 2"]``) in ``step_activations`` (``Float[Tensor, "L F"]``, the
    activations at the noun's step)."""
    units = np.asarray(units, dtype=np.int64).reshape(-1, 2)
    values = step_activations[torch.as_tensor(units[:, 0]), torch.as_tensor(units[:, 1])]
    return np.where(values.float().cpu().numpy() < 0, -1, 1)


@torch.no_grad()
def unit_logit_lens(vlm, units: np.ndarray, k: int = 10, polarity: np.ndarray | None = None,
                    token_ids: np.ndarray | None = None, chunk: int = 512, lens: str = "raw",
                    exclude=None) -> tuple[list[list[int]], np.ndarray | None]:
    """Each unit's logit lens in the direction it writes: ``p · (W_U · W_out[l][:, i])``.

    ``units``: ``Int[ndarray, "N 2"]``; ``polarity``: ``Int[ndarray, "N"]`` of ±1 (default
    all ``+1``); ``token_ids``: ``Int[ndarray, "N"]``, a token per unit whose rank is wanted
    (the noun's).
    Returns ``(top_ids, ranks)``: the top-``k`` token ids of each unit (best first) and,
    when ``token_ids`` is given, ``Int[ndarray, "N"]`` the rank of each unit's token in its
    lens (0 = the unit's top token), else ``None``. Only the asked-for columns are
    multiplied, ``chunk`` at a time: ``(V × D) @ (D × chunk)``.

    ``lens``: ``"raw"`` (the paper's ``W_U · w``), ``"rms"`` (each token's logit divided by
    the RMS of its unembedding row: ranks tokens by direction, so that tokens with large
    unembedding norms stop crowding every unit's top) or ``"norm"`` (the final norm's weight
    folded in); see :func:`lens_unembedding`. ``exclude``: token ids left out of
    the lens (e.g. :func:`~mmneurons_utils.method.vocabulary.hub_tokens`); ranks then count
    only the tokens that remain.
    """
    units = np.asarray(units, dtype=np.int64).reshape(-1, 2)
    n = len(units)
    signs = np.ones(n, dtype=np.int64) if polarity is None else np.asarray(polarity).reshape(-1)
    tokens = None if token_ids is None else np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if len(signs) != n or (tokens is not None and len(tokens) != n):
        raise ValueError(f"polarity and token_ids must have one entry per unit ({n})")
    top: list[list[int]] = [[] for _ in range(n)]
    ranks = None if tokens is None else np.zeros(n, dtype=np.int64)
    w_u = lens_unembedding(vlm, lens)                                                   # (V, D)
    excluded = None if exclude is None or not len(exclude) else \
        torch.as_tensor(np.asarray(list(exclude), dtype=np.int64), device=w_u.device)
    for layer in np.unique(units[:, 0]):
        rows = np.flatnonzero(units[:, 0] == layer)
        w_out = weight(vlm.down_proj(int(layer)))                                       # (D, F)
        for part in np.array_split(rows, max(1, -(-len(rows) // chunk))):
            columns = w_out[:, torch.as_tensor(units[part, 1], device=w_out.device)]   # (D, ≤chunk)
            sign = torch.as_tensor(signs[part], device=w_u.device, dtype=torch.float32)
            lens = (w_u @ columns.to(w_u.device, w_u.dtype)).float() * sign             # (V, ≤chunk)
            if excluded is not None:
                lens[excluded] = -torch.inf
            for row, ids in zip(part, lens.topk(k, dim=0).indices.T.tolist()):
                top[row] = ids
            if tokens is not None:
                own = lens[torch.as_tensor(tokens[part], device=lens.device),
                           torch.arange(len(part), device=lens.device)]                 # (≤chunk,)
                ranks[part] = (lens > own).sum(0).cpu().numpy()
    return top, ranks


LENSES = ("raw", "rms", "norm")


def lens_unembedding(vlm, lens: str = "raw") -> torch.Tensor:
    """``Float[Tensor, "V D"]``: the unembedding a unit's lens reads: ``W_U`` (``"raw"``, the
    paper's), each row divided by its RMS (``"rms"``: tokens ranked by direction, not norm), or
    ``W_U`` with the final norm's weight ``g`` folded in, ``W_U · diag(g)`` (``"norm"``: what
    the model's last RMSNorm does to a direction, up to a positive scale)."""
    if lens not in LENSES:
        raise ValueError(f"lens must be one of {', '.join(LENSES)}, got {lens!r}")
    w_u = weight(vlm.lm_head)
    if lens == "raw":
        return w_u
    w_u = w_u.float()
    if lens == "norm":
        gain = getattr(vlm.final_norm, "weight", None)
        if gain is None:
            raise ValueError(f"{vlm.name}: its final norm has no weight to fold into the lens")
        return w_u * gain.detach().float().to(w_u.device)
    return w_u / w_u.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-12)


def unit_top_tokens(vlm, units: np.ndarray, k: int = 10,
                    polarity: np.ndarray | None = None) -> list[list[int]]:
    """Top-``k`` token ids of each unit's write vector, in the unit's ``polarity``
    (default ``+1``: the top of ``W_U · W_out[l][:, i]``). See :func:`unit_logit_lens`."""
    return unit_logit_lens(vlm, units, k, polarity)[0]


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


# ---------------------------------------------------------------- beyond the paper: noun contrast

@torch.no_grad()
def direction_logit_weights(vlm, directions: torch.Tensor) -> torch.Tensor:
    """``Float[Tensor, "N L F"]``: ``d · W_out[l][:, i]`` for each row ``d`` of
    ``directions`` (``Float[Tensor, "N D"]``, in the unembedding's space; one direction
    ``Float[Tensor, "D"]`` gives ``Float[Tensor, "L F"]``)."""
    per_layer = []
    for layer in range(vlm.n_layers):                    # layers may sit on other devices
        w_out = weight(vlm.down_proj(layer))                                          # (D, F)
        per_layer.append((directions.to(w_out.device, w_out.dtype) @ w_out).float().to(vlm.device))
    return torch.stack(per_layer, dim=-2)


@torch.no_grad()
def contrast_directions(vlm, token_ids, candidate_ids) -> torch.Tensor:
    """``Float[Tensor, "N D"]``: ``W_U[t] − mean_{c ∈ C, c ≠ t} W_U[c]`` for each ``t`` of
    ``token_ids``: the logit-difference direction of ``t`` against the other candidates ``C``."""
    w_u = weight(vlm.lm_head).float()                                                  # (V, D)
    candidates = sorted(set(int(c) for c in candidate_ids))
    rows = []
    for t in token_ids:
        others = [c for c in candidates if c != int(t)]
        if not others:
            raise ValueError("noun_contrast needs at least one candidate noun besides the scored one")
        rows.append(w_u[int(t)] - w_u[torch.as_tensor(others, device=w_u.device)].mean(0))
    return torch.stack(rows)


# ---------------------------------------------------------------- the selection-matched null

def selection_null_units(step_activations: torch.Tensor, logit_weights: torch.Tensor,
                         layer_counts: np.ndarray, seed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The contribution ranking on activations permuted within each layer: the null that
    selects like the method does.

    ``step_activations``: ``Float[Tensor, "L F"]`` at the noun's step; ``logit_weights``:
    the noun's ``Float[Tensor, "L F"]``; ``layer_counts``: ``Int[ndarray, "L"]``, how many
    units the method picked in each layer. Each layer's activations are shuffled over its
    units (seeded), scored ``a_perm · W_U[t] · W_out``, and the top ``layer_counts[l]`` of
    layer ``l`` kept: the same layers and activation magnitudes as the method, the
    activation no longer tied to the unit. Returns ``(units, scores, polarity)`` (``Int[ndarray,
    "K 2"]``, ``Float[ndarray, "K"]``, ``Int[ndarray, "K"]``; best first, polarity the sign of
    the permuted activation the unit was scored with).
    """
    generator = torch.Generator().manual_seed(int(np.random.default_rng(seed).integers(2 ** 62)))
    n_layers, d_ff = step_activations.shape
    picked = []
    for layer in np.flatnonzero(np.asarray(layer_counts) > 0):
        order = torch.randperm(d_ff, generator=generator).to(step_activations.device)
        acts = step_activations[layer].float()[order]                                  # (F,)
        scores = acts * logit_weights[layer].float()
        values, units = scores.topk(int(layer_counts[layer]))
        for value, unit in zip(values.tolist(), units.tolist()):
            picked.append((value, int(layer), unit, -1 if float(acts[unit]) < 0 else 1))
    picked.sort(key=lambda p: (-p[0], p[1], p[2]))
    units = np.array([[p[1], p[2]] for p in picked], dtype=np.int64).reshape(-1, 2)
    return (units, np.array([p[0] for p in picked], dtype=np.float32),
            np.array([p[3] for p in picked], dtype=np.int64))
