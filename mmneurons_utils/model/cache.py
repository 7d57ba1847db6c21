"""The on-disk cache: where it lives and the hash of a model's weights that keys it.

Cached results (the atlas's dataset examples) are keyed by :func:`weights_hash`, a hash of
``W_U`` and every ``W_out`` over their full bytes, so an edited model gets its own entries.
The folder is ``$MMNEURONS_CACHE`` or ``~/.cache/mmneurons``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .offload import weight


def weights_hash(vlm) -> str:
    """A hash of ``W_U`` and every ``W_out`` (full bytes: an edit to one column changes it),
    with the model's name and dtype; read where the forward pass reads them (offloaded too)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{vlm.name}|{vlm.dtype}".encode())
    for module in [vlm.lm_head] + [vlm.down_proj(l) for l in range(vlm.n_layers)]:
        tensor = weight(module).detach().contiguous().cpu()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())  # raw bytes, any dtype
    return digest.hexdigest()


def model_hash(vlm) -> str:
    """A hash of every parameter and buffer of the model (full bytes, in name order), with its
    name and dtype: what any of its outputs was computed from. An edited or retrained model
    hashes differently; a model offloaded to disk is read back for it."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{vlm.name}|{vlm.dtype}".encode())
    tensors = dict(vlm.model.named_parameters())
    tensors.update(dict(vlm.model.named_buffers()))
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if tensor.device.type == "meta":      # offloaded: the weight as the forward pass reads it
            continue
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        tensor = tensor.contiguous().cpu().reshape(-1)          # a 0-d buffer has no byte view
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("MMNEURONS_CACHE", Path.home() / ".cache" / "mmneurons"))
