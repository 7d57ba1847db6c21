"""Reversible interventions on FFN units: weight-level perturbations and activation hooks.

A unit ``(l, i)`` writes ``a[l, i] · W_out[l][:, i]`` into the residual stream, where
``W_out[l]`` is ``down_proj.weight`` (``D × F``). Three ways to intervene:

* :func:`perturb_units` changes the **write vectors** (``down_proj`` columns) inside a
  ``with`` block: Gaussian noise (σ relative to each column's RMS, or absolute),
  zeroing, or scaling. It acts at every position and every generation step, like the
  paper's perturbation experiment. The original columns are cloned once per unique
  column *before* anything is touched and copied back in ``finally``, so the weights
  are restored bit-for-bit on normal exit, on exceptions, and when a unit is listed twice.
* :func:`ablate_activations` leaves the weights alone and zeroes/scales the unit's
  **coefficient** ``a[l, i]`` (the input of ``down_proj``) at chosen sequence positions
  only, through :func:`~mmneurons_utils.model.trace.trace_down_proj`. Zeroing at every position
  is exactly zeroing the column; restricting the positions (e.g. only the noun's step) is
  the comparison.
* :func:`added_deltas` adds ``a[..., units] @ Δ`` to ``down_proj``'s output: the same as
  moving the write vectors by ``Δ`` but without touching the weights, so gradients reach
  ``Δ`` (what :func:`~mmneurons_utils.interventions.editing.edit_token` trains).
* :func:`perturb_rows` gives each row of a batch its own perturbation (:class:`RowPerturbation`:
  zeroing, at every position or at chosen ones, or exactly :func:`perturb_units`'s noise, added as
  ``a[..., units] @ Δ``), so several ablation conditions run in one forward or one ``generate``
  (the causal curves' batched path); the weights are never written.

Units are given as ``Int[ndarray, "N 2"]`` of ``(layer, unit)`` rows, a list of pairs, or rows of
a ``find_neurons`` table (its ``layer`` and ``unit`` columns, e.g. ``units_of(table, …)``).
A unit listed more than once is intervened on once: the argument is a *set* of units.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..model.offload import weight, write_columns
from ..model.trace import trace_down_proj

MODES = ("noise", "zero", "scale")


def as_units(vlm, units) -> np.ndarray:
    """``Int[ndarray, "N 2"]`` of ``(layer, unit)`` rows, checked against the model's size.

    Raises ``ValueError`` naming the bad row and the valid ranges.
    """
    if hasattr(units, "columns"):  # a find_neurons table (or a slice of it): its layer, unit
        if not {"layer", "unit"} <= set(units.columns):
            raise ValueError(f"a units table needs 'layer' and 'unit' columns, got {list(units.columns)}")
        units = units[["layer", "unit"]].to_numpy()
    arr = np.asarray(units if len(units) else np.zeros((0, 2)), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"units must be (layer, unit) pairs, shape (n, 2); got shape {arr.shape}")
    bad = (arr[:, 0] < 0) | (arr[:, 0] >= vlm.n_layers) | (arr[:, 1] < 0) | (arr[:, 1] >= vlm.d_ff)
    if bad.any():
        row = tuple(int(v) for v in arr[np.flatnonzero(bad)[0]])
        raise ValueError(f"unit {row} is out of range: layers 0 … {vlm.n_layers - 1}, "
                         f"units 0 … {vlm.d_ff - 1}")
    return arr


def unique_units(units: np.ndarray) -> dict[int, np.ndarray]:
    """Layer → its sorted unique unit indices (``Int[ndarray, "N"]``, the layer's ``N`` units)."""
    units = np.unique(np.asarray(units, dtype=np.int64).reshape(-1, 2), axis=0)
    return {int(layer): units[units[:, 0] == layer, 1] for layer in np.unique(units[:, 0])}


@contextmanager
def saved_columns(vlm, units) -> Iterator[dict[int, np.ndarray]]:
    """Clone the ``down_proj`` columns of ``units`` (once per unique column) and copy them
    back bit-for-bit when the block ends, however it ends. Yields layer → unit indices."""
    by_layer = unique_units(as_units(vlm, units))
    originals = {layer: weight(vlm.down_proj(layer))[:, torch.as_tensor(cols)].detach().clone()
                 for layer, cols in by_layer.items()}                       # (D, N) each
    try:
        yield by_layer
    finally:
        for layer, cols in by_layer.items():
            write_columns(vlm.down_proj(layer), torch.as_tensor(cols), originals[layer])


@contextmanager
def perturb_units(vlm, units, mode: str = "noise", sigma: float = 1.0, relative: bool = True,
                  factor: float = 0.0, seed: int = 0) -> Iterator[None]:
    """Perturb the write vectors ``W_out[l][:, i]`` of ``units`` inside the block.

    * ``mode="noise"``: add ``ε ~ N(0, σ²)`` per weight, with ``σ`` multiplied by the
      column's RMS when ``relative`` (so σ = 1 adds noise as large as the column itself,
      comparable across layers and models) or taken as is when not (the official code's
      absolute noise). The noise is drawn on the CPU from ``seed`` in float32, column by
      column in sorted ``(layer, unit)`` order, so it does not depend on the device.
    * ``mode="zero"``: set the columns to 0 (the unit writes nothing).
    * ``mode="scale"``: multiply the columns by ``factor``.

    Restored bit-for-bit on exit (see :func:`saved_columns`). The block runs in the
    caller's grad mode (gradients through the perturbed model work inside it).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "noise" and not (float(sigma) >= 0):
        raise ValueError(f"sigma must be a non-negative number, got {sigma!r}")
    generator = torch.Generator().manual_seed(int(seed))
    with saved_columns(vlm, units) as by_layer:
        with torch.no_grad():  # only the writes: the block runs in the caller's grad mode
            for layer, cols in by_layer.items():
                module = vlm.down_proj(layer)
                idx, w = torch.as_tensor(cols), weight(module)
                columns = w[:, idx.to(w.device)].float()                      # (D, N)
                if mode == "zero":
                    columns = torch.zeros_like(columns)
                elif mode == "scale":
                    columns = columns * float(factor)
                else:
                    noise = torch.randn(columns.shape[1], columns.shape[0], generator=generator).T
                    scale = columns.pow(2).mean(0, keepdim=True).sqrt() if relative else 1.0
                    columns = columns + float(sigma) * scale * noise.to(columns.device)
                write_columns(module, idx, columns)
        yield


def _position_mask(positions, start: int, length: int, device) -> torch.Tensor | None:
    """``Bool[Tensor, "T"]`` (``T`` = ``length``) of which of the call's positions
    ``start … start+length-1`` are chosen; ``None`` means all."""
    if positions is None:
        return None
    span = torch.arange(start, start + length, device=device)
    if isinstance(positions, slice):
        lo = 0 if positions.start is None else positions.start
        hi = np.iinfo(np.int64).max if positions.stop is None else positions.stop
        return (span >= lo) & (span < hi)
    chosen = torch.as_tensor(sorted(set(int(p) for p in positions)), device=device, dtype=torch.long)
    return torch.isin(span, chosen)


@contextmanager
def ablate_activations(vlm, units, mode: str = "zero", factor: float = 0.0,
                       positions: Sequence[int] | slice | None = None) -> Iterator[None]:
    """Zero (``mode="zero"``) or scale by ``factor`` (``mode="scale"``) the coefficients
    ``a[l, i]`` of ``units`` — the input of ``down_proj`` — at ``positions`` only.

    ``positions``: absolute positions in the sequence (prompt + generated tokens), a
    ``slice`` of them (``slice(p, None)`` = from ``p`` on), or ``None`` for every position.
    The hook tracks positions across calls: a call with more than one position starts a
    new sequence at 0 (a prefill, or a forward without the KV cache); a one-position call
    continues it (a cached generation step). So the same ``positions`` mean the same tokens
    in a teacher-forced forward and in ``generate`` with or without the cache.
    Weights are never touched; hooks are removed when the block ends.
    """
    if mode not in ("zero", "scale"):
        raise ValueError(f"mode must be 'zero' or 'scale', got {mode!r}")
    value = 0.0 if mode == "zero" else float(factor)
    by_layer = unique_units(as_units(vlm, units))
    state = {layer: 0 for layer in by_layer}   # where each layer's next call starts
    columns = {}                               # (layer, device) → the layer's unit indices

    def ablate(x, layer):                      # x: (B, T, F)
        seq = x.shape[1]
        start = 0 if seq > 1 else state[layer]
        state[layer] = start + seq
        idx = columns.setdefault((layer, x.device), torch.as_tensor(by_layer[layer], device=x.device))
        mask = _position_mask(positions, start, seq, x.device)
        x = x.clone()
        if mask is None:
            x[..., idx] = x[..., idx] * value
        elif mask.any():
            sub = x[:, mask]                   # (B, T_chosen, F)
            sub[..., idx] = sub[..., idx] * value
            x[:, mask] = sub
        return x

    with trace_down_proj(vlm, by_layer, edit_input=ablate):
        yield


@contextmanager
def added_deltas(vlm, units, deltas: torch.Tensor) -> Iterator[None]:
    """Within the block, unit ``units[j]`` writes ``a · (W_out[:, i] + Δ[j])``: ``down_proj``'s
    output gains ``a[..., units] @ Δ`` — the same as ``W_out[:, units] += Δᵀ`` without
    touching the weights, so gradients reach ``deltas`` (``Float[Tensor, "N D"]``, one row per
    row of ``units``, in the given order) and nothing needs restoring (editing trains this way).
    """
    units = as_units(vlm, units)
    if len(units) != len(np.unique(units, axis=0)):
        raise ValueError("units must be distinct: each row gets its own delta")
    if deltas.shape[0] != len(units):
        raise ValueError(f"deltas has {deltas.shape[0]} rows for {len(units)} units")
    rows = {int(layer): np.flatnonzero(units[:, 0] == layer) for layer in np.unique(units[:, 0])}
    index = {layer: (torch.as_tensor(r, device=deltas.device),
                     torch.as_tensor(units[r, 1], device=deltas.device)) for layer, r in rows.items()}

    def add(output, x, layer):                 # output: (B, T, D); layers may sit on other devices
        which, cols = index[layer]
        change = x[..., cols.to(x.device)].float() @ deltas[which].to(x.device)
        return output + change.to(output.dtype)

    with trace_down_proj(vlm, rows, edit_output=add):
        yield


def column_snapshot(vlm, units: Iterable) -> list[torch.Tensor]:
    """Clones of the ``down_proj`` columns of ``units``, in order (an edit's originals, undo checks)."""
    return [weight(vlm.down_proj(int(l)))[:, int(u)].detach().clone() for l, u in as_units(vlm, units)]


# ---------------------------------------------------------------------------------------------
# Several perturbations at once: one per row of a batch (per-example hooks)
# ---------------------------------------------------------------------------------------------

ROW_MODES = ("zero", "noise")


@dataclass(frozen=True)
class RowPerturbation:
    """What one row of a batch gets inside :func:`perturb_rows`.

    ``units``: ``Int[ndarray, "N 2"]`` ``(layer, unit)`` rows (a set, as everywhere here).
    ``mode="zero"``: the units write nothing — at every position (``positions=None``, the same
    products as zeroing their ``down_proj`` columns: :func:`perturb_units` ``mode="zero"``), or
    only at the absolute ``positions`` (:func:`ablate_activations`). ``mode="noise"``: the
    columns move by exactly the noise :func:`perturb_units` ``mode="noise"`` adds for the same
    ``sigma`` / ``relative`` / ``seed`` (same generator, same order, same values).
    """

    units: np.ndarray
    mode: str = "zero"
    sigma: float = 1.0
    relative: bool = True
    seed: int = 0
    positions: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.mode not in ROW_MODES:
            raise ValueError(f"mode must be one of {', '.join(ROW_MODES)}, got {self.mode!r}")
        if self.mode == "noise" and self.positions is not None:
            raise ValueError("noise moves the write vectors (every position); positions are for mode='zero'")
        if self.mode == "noise" and not (float(self.sigma) >= 0):
            raise ValueError(f"sigma must be a non-negative number, got {self.sigma!r}")


def noise_deltas(vlm, units, sigma: float, relative: bool = True, seed: int = 0) -> dict[int, tuple]:
    """Layer → ``(unit indices Int[Tensor, "N"], Δ Float[Tensor, "N D"])``: how far
    :func:`perturb_units` ``mode="noise"`` with these arguments moves each column (new column as
    written in the weight's dtype, minus the old one), drawn from the same generator in the same
    order — so adding ``a[..., units] @ Δ`` to ``down_proj``'s output is that perturbation."""
    generator = torch.Generator().manual_seed(int(seed))
    out = {}
    with torch.no_grad():
        for layer, cols in unique_units(as_units(vlm, units)).items():
            idx, w = torch.as_tensor(cols), weight(vlm.down_proj(layer))
            columns = w[:, idx.to(w.device)].float()                          # (D, N)
            noise = torch.randn(columns.shape[1], columns.shape[0], generator=generator).T
            scale = columns.pow(2).mean(0, keepdim=True).sqrt() if relative else 1.0
            new = (columns + float(sigma) * scale * noise.to(columns.device)).to(w.dtype).float()
            out[layer] = (idx, (new - columns).T.contiguous())                # (N, D)
    return out


@contextmanager
def perturb_rows(vlm, rows: Sequence[RowPerturbation | None]) -> Iterator[None]:
    """Inside the block, row ``r`` of every forward's batch (``B = len(rows)``) runs under
    ``rows[r]`` (``None``: clean) — several conditions in one batched forward or ``generate``.

    Weights are never touched (the hooks read ``down_proj``'s input and add to its output), so
    nothing needs restoring and rows cannot leak into each other. Zeroing multiplies the units'
    coefficients by 0 (the products of a zeroed column); noise adds ``a[..., units] @ Δ``
    (:func:`noise_deltas`), equal to :func:`perturb_units` up to float summation order.
    Positions are tracked across calls as in :func:`ablate_activations` (a multi-position call
    starts a sequence at 0, a one-position call continues it), so ``positions`` mean the same
    tokens in a teacher-forced forward and in a cached ``generate``. Every forward inside the
    block must have batch ``B`` (``ValueError`` otherwise).
    """
    batch = len(rows)
    zero_all: dict[int, torch.Tensor] = {}     # layer → (B, F) multipliers (0 at zeroed units)
    zero_at: dict[int, list] = {}              # layer → [(row, positions, unit indices)]
    noise: dict[int, list] = {}                # layer → [(row, unit indices, Δ (N, D))]
    for r, row in enumerate(rows):
        if row is None or len(row.units) == 0:
            continue
        if row.mode == "noise":
            for layer, (idx, delta) in noise_deltas(vlm, row.units, row.sigma, row.relative,
                                                    row.seed).items():
                noise.setdefault(layer, []).append((r, idx, delta))
            continue
        for layer, cols in unique_units(as_units(vlm, row.units)).items():
            if row.positions is None:
                mask = zero_all.setdefault(layer, torch.ones(batch, vlm.d_ff))
                mask[r, torch.as_tensor(cols)] = 0.0
            else:
                zero_at.setdefault(layer, []).append(
                    (r, torch.as_tensor(sorted(set(int(p) for p in row.positions))), torch.as_tensor(cols)))
    packed = {}                                # layer → (B, Nmax) indices, (B, Nmax, D) Δ (0-padded)
    for layer, entries in noise.items():
        width = max(len(idx) for _, idx, _ in entries)
        dim = entries[0][2].shape[1]
        index = torch.zeros(batch, width, dtype=torch.long)
        deltas = torch.zeros(batch, width, dim)
        for r, idx, delta in entries:
            index[r, :len(idx)], deltas[r, :len(idx)] = idx, delta
        packed[layer] = (index, deltas)
    state = {layer: 0 for layer in set(zero_all) | set(zero_at)}
    cache: dict = {}                           # (what, layer, device, dtype) → tensor there

    def moved(what, layer, tensor, like):
        key = (what, layer, like.device, like.dtype if tensor.is_floating_point() else None)
        if key not in cache:
            cache[key] = tensor.to(like.device, like.dtype if tensor.is_floating_point() else None)
        return cache[key]

    def check(x):
        if x.shape[0] != batch:
            raise ValueError(f"perturb_rows holds {batch} rows but a forward had batch {x.shape[0]}")

    def edit_input(x, layer):                  # x: (B, T, F)
        check(x)
        if layer not in state:
            return None
        seq = x.shape[1]
        start = 0 if seq > 1 else state[layer]
        state[layer] = start + seq
        if layer in zero_all:
            x = x * moved("mask", layer, zero_all[layer], x)[:, None, :]
        else:
            x = x.clone()
        for r, positions, cols in zero_at.get(layer, ()):
            local = positions[(positions >= start) & (positions < start + seq)] - start
            if len(local):
                local, cols = local.to(x.device), cols.to(x.device)
                x[r, local[:, None], cols[None, :]] = 0.0
        return x

    def edit_output(output, x, layer):         # output: (B, T, D)
        if layer not in packed:
            return None
        index, deltas = packed[layer]
        index, deltas = moved("index", layer, index, x), moved("delta", layer, deltas, x)
        picked = torch.gather(x, 2, index[:, None, :].expand(-1, x.shape[1], -1))   # (B, T, Nmax)
        return output + torch.bmm(picked, deltas).to(output.dtype)

    layers = sorted(set(zero_all) | set(zero_at) | set(packed))
    with trace_down_proj(vlm, layers, edit_input=edit_input,
                         edit_output=edit_output if packed else None):
        yield
