"""The neuron vocabulary: each unit's top tokens under the logit lens, at both ends.

Unit ``(l, i)`` writes ``W_out[l][:, i]`` into the residual stream; its top tokens
are the arg-top-k of ``p · W_U · W_out[l][:, i]`` where ``p`` is its polarity (the sign
of its coefficient; see :mod:`mmneurons_utils.method.scoring`). The table keeps both ends of
every unit's lens (``p = +1``: the top; ``p = −1``: the bottom), so either polarity is a
lookup. The full product ``W_U · W_out[l]``
is ``V × F`` per layer (1.4 GB in float32 for a LLaVA-1.5-7B layer, ~45 GB for
all 32), which the official code stores. Here it is never formed: the vocabulary
is walked in chunks of ``chunk`` rows with a running top-k, ``block`` units at a time,
so the extra memory is about ``block × (chunk + 4k)`` values — one reused buffer and the
merge buffers — however large ``d_ff`` and the vocabulary are.

The table is cached on disk per model, keyed by a hash of ``W_U`` and every
``W_out`` (an edited model gets its own entry), under ``$MMNEURONS_CACHE`` or
``~/.cache/mmneurons``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.offload import weight
from ..store.results import atomic_write


@dataclass
class NeuronVocabulary:
    """``ids``: ``Int[Tensor, "L F K"]`` token ids, best first; ``logits``:
    ``Float[Tensor, "L F K"]`` (the top of ``W_U · W_out``); ``bottom_ids`` /
    ``bottom_logits``: the same for ``−W_U · W_out`` (a unit of polarity −1), so
    ``bottom_logits`` are the negated logits."""

    ids: torch.Tensor
    logits: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_logits: torch.Tensor

    def top_ids(self, layer: int, unit: int, polarity: int = 1) -> list[int]:
        """Token ids of unit ``(layer, unit)`` in the direction ``polarity`` writes, best first."""
        return (self.ids if polarity >= 0 else self.bottom_ids)[layer, unit].tolist()

    def tokens(self, tokenizer, layer: int, unit: int, polarity: int = 1) -> list[str]:
        return tokenizer.convert_ids_to_tokens(self.top_ids(layer, unit, polarity))


@torch.no_grad()
def topk_columns(w_u: torch.Tensor, w_out: torch.Tensor, k: int, chunk: int = 256,
                 block: int = 1024):
    """Top-``k`` rows of ``w_u @ w_out`` for every column, without forming the product.

    ``w_u``: ``Float[Tensor, "V D"]``, ``w_out``: ``Float[Tensor, "D F"]`` →
    ``(values, ids)``, ``Float[Tensor, "F K"]`` and ``Int[Tensor, "F K"]`` (``K`` = ``k``),
    values descending. Columns are taken ``block`` at a time (they are independent); for
    each block the vocabulary is walked ``chunk`` rows at a time into one reused
    ``block × chunk`` buffer, and each chunk's own top-k is merged into the running top-k.
    Extra memory: about ``block × (chunk + 4k)`` values, whatever ``F`` and ``V`` are.
    """
    n_vocab, d_ff = w_u.shape[0], w_out.shape[1]
    if not 1 <= k <= n_vocab:
        raise ValueError(f"k must be in 1 … {n_vocab} (the vocabulary size), got {k}")
    results = [_topk_block(w_u, w_out[:, b:b + block], k, chunk) for b in range(0, d_ff, block)]
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


def _topk_block(w_u, w_out, k, chunk):
    n_vocab = w_u.shape[0]
    # scores are laid out (block, chunk) so that top-k runs along the contiguous axis
    buffer = torch.empty((w_out.shape[1], min(chunk, n_vocab)), device=w_out.device, dtype=w_out.dtype)
    best_values = best_ids = None
    for start in range(0, n_vocab, chunk):
        rows = w_u[start:start + chunk]                                        # (≤chunk, D)
        width = rows.shape[0]
        scores = torch.matmul(w_out.T, rows.T, out=buffer[:, :width] if width == buffer.shape[1]
                              else None)                                       # (block, ≤chunk)
        values, ids = scores.topk(min(k, width), dim=1)                        # (block, ≤K)
        values, ids = values.float(), ids + start
        if best_values is not None:
            merged = torch.cat([best_values, values], 1)                         # (block, ≤2K)
            values, where = merged.topk(min(k, merged.shape[1]), dim=1)
            ids = torch.cat([best_ids, ids], 1).gather(1, where)
        best_values, best_ids = values, ids
    return best_values, best_ids


def weights_key(vlm, k: int) -> str:
    """A hash of ``W_U`` and every ``W_out`` (full bytes: an edit to one column changes it)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{vlm.name}|{k}|{vlm.dtype}|both-ends".encode())
    for module in [vlm.lm_head] + [vlm.down_proj(l) for l in range(vlm.n_layers)]:
        tensor = weight(module).detach().contiguous().cpu()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("MMNEURONS_CACHE", Path.home() / ".cache" / "mmneurons"))


def neuron_vocabulary(vlm, k: int = 10, chunk: int = 256, use_cache: bool = True,
                      progress: bool = False) -> NeuronVocabulary:
    """Every unit's top-``k`` tokens at both ends of its lens, from the disk cache when the
    weights are unchanged."""
    from tqdm.auto import tqdm

    path = cache_dir() / "vocabulary" / f"{weights_key(vlm, k)}.pt"
    if use_cache and path.is_file():
        return NeuronVocabulary(**torch.load(path, map_location="cpu"))
    ends = {"ids": [], "logits": [], "bottom_ids": [], "bottom_logits": []}
    w_u = weight(vlm.lm_head).detach()
    for layer in tqdm(range(vlm.n_layers), desc="neuron vocabulary", disable=not progress):
        w_out = weight(vlm.down_proj(layer)).detach().to(w_u.device)
        for prefix, sign in (("", 1), ("bottom_", -1)):
            values, top = topk_columns(w_u, sign * w_out, k, chunk)
            ends[f"{prefix}ids"].append(top.cpu())
            ends[f"{prefix}logits"].append(values.cpu())
    table = NeuronVocabulary(**{name: torch.stack(parts) for name, parts in ends.items()})
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(vars(table), tmp))
    return table
