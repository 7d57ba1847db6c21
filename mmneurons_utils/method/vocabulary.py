"""What the vocabulary allows a unit's logit lens to say: ceilings and hub tokens.

"Noun in the unit's top-10 tokens" can only be scored where some unit of the model has the
noun in its top 10 at all. On a 49,152-token vocabulary most nouns are named by a handful of
the 46,080 units, or by none; a few **hub tokens** sit in the top 10 of thousands of units and
crowd the nouns out. Both are properties of the weights alone (``W_U · W_out``), computed once
per model:

* :func:`lens_extremes`: every unit's top-``k`` tokens in either direction (``+w`` and ``−w``),
  one chunked ``(V × D) @ (D × F)`` matmul per layer, cached on the model object;
* :func:`naming_units`: per token, how many units name it among their top-``k`` (either sign)
  — the **ceiling** of a noun: zero means no ranking of units can score a hit for it;
* :func:`hub_tokens`: tokens in the top-``k`` of more than ``share`` of the units.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..model.cache import cache_dir, weights_hash
from ..model.offload import weight
from ..store.files import atomic_write
from .scoring import lens_unembedding


@torch.no_grad()
def lens_extremes(vlm, k: int = 10, lens: str = "raw", chunk: int = 512) -> np.ndarray:
    """``Int[ndarray, "L F 2 K"]``: each unit's top-``k`` token ids of ``W_U · w`` (``[..., 0,
    :]``) and of ``−W_U · w`` (``[..., 1, :]``), ``w = W_out[l][:, i]``.

    Cached per ``(k, lens)`` on ``vlm`` and on disk under ``<cache>/lens/``, keyed by the
    weights' hash (3.7 MB for smol-llava's 46,080 units at k = 10; computing it takes about a
    minute there on one CPU thread, a file read afterwards). A cache file that does not load
    or has the wrong shape is computed again and replaced."""
    cache = vlm.__dict__.setdefault("_lens_extremes", {})
    if (k, lens) in cache:
        return cache[k, lens]
    key = weights_hash(vlm)
    if lens == "norm":
        gain = weight(vlm.final_norm).detach().float().cpu().numpy().tobytes()
        key += "-" + hashlib.blake2b(gain, digest_size=8).hexdigest()
    path = cache_dir() / "lens" / f"{key}-{lens}-k{k}.npy"
    shape = (vlm.n_layers, vlm.d_ff, 2, k)
    try:
        stored = np.load(path)
        if stored.shape == shape:
            cache[k, lens] = stored
            return stored
    except (OSError, ValueError):
        pass
    out = _compute_extremes(vlm, k, lens, chunk)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), out))
    except OSError:
        pass                     # an unwritable cache only costs the recomputation next time
    cache[k, lens] = out
    return out


@torch.no_grad()
def _compute_extremes(vlm, k: int, lens: str, chunk: int) -> np.ndarray:
    w_u = lens_unembedding(vlm, lens)                                               # (V, D)
    out = np.zeros((vlm.n_layers, vlm.d_ff, 2, k), dtype=np.int32)
    for layer in range(vlm.n_layers):
        w_out = weight(vlm.down_proj(layer))                                        # (D, F)
        for start in range(0, vlm.d_ff, chunk):
            block = (w_u @ w_out[:, start:start + chunk].to(w_u.device, w_u.dtype)).float()   # (V, c)
            stop = start + block.shape[1]
            out[layer, start:stop, 0] = block.topk(k, dim=0).indices.T.cpu().numpy()
            out[layer, start:stop, 1] = (-block).topk(k, dim=0).indices.T.cpu().numpy()
    return out


def naming_units(vlm, token_ids, k: int = 10, lens: str = "raw") -> np.ndarray:
    """``Int[ndarray, "N"]``: for each token id, the number of units whose top-``k`` tokens in
    either direction contain it (a unit counts once even if both directions do)."""
    extremes = lens_extremes(vlm, k, lens).reshape(vlm.n_layers * vlm.d_ff, -1)  # (U, 2K)
    return np.array([int(np.any(extremes == int(t), axis=1).sum()) for t in token_ids], dtype=np.int64)


def unit_token_counts(vlm, k: int = 10, lens: str = "raw") -> np.ndarray:
    """``Int[ndarray, "V"]``: in how many units' top-``k`` (either direction) each token is."""
    extremes = lens_extremes(vlm, k, lens).reshape(vlm.n_layers * vlm.d_ff, -1)
    per_unit = np.sort(extremes, axis=1)
    first = np.ones_like(per_unit, dtype=bool)
    first[:, 1:] = per_unit[:, 1:] != per_unit[:, :-1]                  # each token once per unit
    return np.bincount(per_unit[first], minlength=max(vlm.lm_head.out_features, int(extremes.max()) + 1))


def hub_tokens(vlm, share: float = 0.01, k: int = 10, lens: str = "raw",
               over_chance: float = 5.0) -> np.ndarray:
    """``Int[ndarray, "H"]``: token ids in the top-``k`` (either direction) of more than
    ``share`` of all units and more than ``over_chance`` times what chance gives (``2k / V``
    of them: on a 75-token vocabulary every token is in a quarter of the units' lists), most
    frequent first."""
    counts = unit_token_counts(vlm, k, lens)
    threshold = max(share, over_chance * 2 * k / vlm.lm_head.out_features)
    hubs = np.flatnonzero(counts > threshold * vlm.n_layers * vlm.d_ff)
    return hubs[np.argsort(-counts[hubs], kind="stable")]
