"""Record the FFN neuron activations during generation (KV cache on).

The activation of unit ``i`` in decoder layer ``l`` is the **input of**
``down_proj`` at that unit: for a gated FFN ``down_proj(act(gate(x)) * up(x))``
that is ``act(gate(x)) * up(x)``, the exact coefficient of the unit's write
vector ``W_out[l][:, i]``. A ``forward_pre_hook`` on ``down_proj`` reads it.
``activation="act_fn"`` instead records ``act(gate(x))`` (the official code's
tensor) for comparison; it is *not* the coefficient of the write vector.

Two things are kept, nothing else:

* ``steps``: at every generation step, the last position — the one whose logits
  produce that step's token. With the KV cache the prefill call's last position
  produces token 0 and each later call (one position) produces the next token;
  without the cache every call re-runs the whole sequence and its last position
  is still the one. So both modes record the same vectors.
* ``image`` (optional): every image-token position of the prefill call.

Hooks (a :class:`~mmneurons_utils.model.trace.TraceDict`) live only inside the ``with`` block and
are removed also when generation raises. Teacher forcing (a given caption, one forward) is
in :mod:`mmneurons_utils.model.teacher_forcing`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from . import architectures as A
from .trace import TraceDict

ACTIVATIONS = ("down_proj_input", "act_fn")


@dataclass
class Activations:
    """One image's recorded activations (model dtype, model device).

    ``steps``: ``Float[Tensor, "S L F"]`` (``S`` generated steps), row ``j`` is the position whose
    logits produced generated token ``j``.
    ``image``: ``Float[Tensor, "L I F"]`` (``I`` image tokens) or ``None``.
    """

    steps: torch.Tensor
    image: torch.Tensor | None
    kind: str = "down_proj_input"


class _Recording:
    def __init__(self, n_layers: int, image_mask: torch.Tensor | None, device: torch.device):
        self.image_mask = image_mask
        self.device = device       # one device for every layer's rows (a device map spreads them)
        self.calls = [0] * n_layers
        self.step_rows: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.image_rows: list[list[torch.Tensor] | None] = [None] * n_layers
        self._stacked: torch.Tensor | None = None

    def record(self, layer: int, x: torch.Tensor) -> None:
        """Keep one call's last position (and, on the prefill, the image rows) of
        ``x``: ``Float[Tensor, "B T F"]``."""
        if self.calls[layer] == 0 and self.image_mask is not None:
            if self.image_mask.shape != x.shape[:2]:
                raise RuntimeError(f"image mask {tuple(self.image_mask.shape)} does not match "
                                   f"the prefill's {tuple(x.shape[:2])} positions")
            # one (I, F) per row, I the row's own: rows may hold different numbers of
            # image tokens (llava_next / idefics3 images of other sizes)
            mask = self.image_mask.to(x.device)
            self.image_rows[layer] = [row[m].to(self.device) for row, m in zip(x.detach(), mask)]
        self.step_rows[layer].append(x.detach()[:, -1].to(self.device))
        self.calls[layer] += 1

    def for_row(self, row: int, n_steps: int, kind: str) -> Activations:
        if self._stacked is None:  # once per batch: Float[Tensor, "S B L F"]
            self._stacked = torch.stack([torch.stack(rows, 0) for rows in self.step_rows], 2)
        steps = self._stacked[:n_steps, row]
        image = None
        if self.image_mask is not None:
            image = torch.stack([rows[row] for rows in self.image_rows], 0)
        return Activations(steps=steps, image=image, kind=kind)


@contextmanager
def record_activations(vlm, image_mask: torch.Tensor | None = None,
                       activation: str = "down_proj_input") -> Iterator[_Recording]:
    """Hooks on every decoder layer while the block runs.

    ``image_mask``: ``Bool[Tensor, "B T"]`` of the prefill's image positions
    (from ``vlm.image_token_mask(input_ids)``), or ``None`` to skip them.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    recording = _Recording(vlm.n_layers, image_mask, vlm.device)
    if activation == "down_proj_input":  # read before down_proj: its input is the coefficient
        modules = {layer: vlm.down_proj(layer) for layer in range(vlm.n_layers)}
        options = dict(edit_input=lambda x, layer: recording.record(layer, x))
    else:                                # read after act_fn: its output
        modules = {layer: A.resolve(vlm.layers[layer], vlm.arch.act_fn) for layer in range(vlm.n_layers)}
        options = dict(edit_output=lambda out, x, layer: recording.record(layer, out))
    try:
        traces = TraceDict(modules, **options)
    except ValueError as exc:  # a shared module would fire every layer's hook
        raise RuntimeError(f"{vlm.name}: layers share one {activation} module; "
                           "cannot tell them apart") from exc
    with traces:
        yield recording
