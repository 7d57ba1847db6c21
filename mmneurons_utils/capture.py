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

Hooks live only inside the ``with`` block and are removed also when generation raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from . import architectures as A

ACTIVATIONS = ("down_proj_input", "act_fn")


@dataclass
class Activations:
    """One image's recorded activations (model dtype, model device).

    ``steps``: ``Float[Tensor, "steps layers d_ff"]``, row ``j`` is the position whose
    logits produced generated token ``j``.
    ``image``: ``Float[Tensor, "layers n_image_tokens d_ff"]`` or ``None``.
    """

    steps: torch.Tensor
    image: torch.Tensor | None
    kind: str = "down_proj_input"


class _Recording:
    def __init__(self, n_layers: int, image_mask: torch.Tensor | None):
        self.image_mask = image_mask
        self.calls = [0] * n_layers
        self.step_rows: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.image_rows: list[list[torch.Tensor] | None] = [None] * n_layers
        self._stacked: torch.Tensor | None = None

    def hook(self, layer: int):
        def record(x: torch.Tensor) -> None:  # x: Float[Tensor, "batch seq d_ff"]
            if self.calls[layer] == 0 and self.image_mask is not None:
                if self.image_mask.shape != x.shape[:2]:
                    raise RuntimeError(f"image mask {tuple(self.image_mask.shape)} does not match "
                                       f"the prefill's {tuple(x.shape[:2])} positions")
                # one (n_image_tokens_r, d_ff) per row: rows may hold different numbers of
                # image tokens (llava_next / idefics3 images of other sizes)
                self.image_rows[layer] = [row[mask] for row, mask in zip(x.detach(), self.image_mask)]
            self.step_rows[layer].append(x.detach()[:, -1])
            self.calls[layer] += 1
        return record

    def for_row(self, row: int, n_steps: int, kind: str) -> Activations:
        if self._stacked is None:  # once per batch: Float[Tensor, "steps batch layers d_ff"]
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

    ``image_mask``: ``Bool[Tensor, "batch seq"]`` of the prefill's image positions
    (from ``vlm.image_token_mask(input_ids)``), or ``None`` to skip them.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    recording = _Recording(vlm.n_layers, image_mask)
    if activation == "down_proj_input":
        modules = [vlm.down_proj(layer) for layer in range(vlm.n_layers)]
    else:
        modules = [A.resolve(vlm.layers[layer], vlm.arch.act_fn) for layer in range(vlm.n_layers)]
    if len({id(m) for m in modules}) != len(modules):  # a shared module would fire every layer's hook
        raise RuntimeError(f"{vlm.name}: layers share one {activation} module; cannot tell them apart")
    handles = []
    try:
        for layer, module in enumerate(modules):
            record = recording.hook(layer)
            if activation == "down_proj_input":
                handles.append(module.register_forward_pre_hook(lambda m, args, r=record: r(args[0])))
            else:
                handles.append(module.register_forward_hook(lambda m, args, out, r=record: r(out)))
        yield recording
    finally:
        for handle in handles:
            handle.remove()



# Per-position inputs that are not the language model's sequence (vision / Q-Former side).
_NOT_LM_POSITIONS = ("pixel_", "image_", "qformer_")


def append_captions(inputs: dict, captions, pad_id: int = 0) -> tuple[dict, int, int]:
    """Teacher-forcing inputs: the encoded prompts ``inputs`` (batch ``len(captions)``,
    left-padded as :meth:`VLM.inputs` makes them) with each caption's token ids appended,
    right-padded: ``(inputs, prompt_len, longest)``.

    Every per-position input (``Int[Tensor, "batch seq"]``) is extended as ``generate``
    extends it for generated tokens: ``attention_mask`` with 1 (0 on the padding),
    ``token_type_ids`` with 1 (PaliGemma's causal suffix: the caption attends causally, as
    in generation, not bidirectionally like the prompt prefix), ``mm_token_type_ids`` with 0
    (text), anything else of that shape with its last prompt value. ``labels`` (PaliGemma's
    processor returns them) are dropped: they cover the prompt only.

    Causal attention keeps the padding invisible to the real positions; the logits at
    position ``prompt_len - 1 + j`` are the distribution that produced caption token ``j``
    in every row (the prompts end together).
    """
    ids = inputs["input_ids"]
    batch, prompt_len = ids.shape
    longest = max((len(c) for c in captions), default=0)
    tail = torch.full((len(captions), longest), pad_id, dtype=ids.dtype, device=ids.device)
    real = torch.zeros((len(captions), longest), dtype=torch.bool, device=ids.device)
    for r, caption in enumerate(captions):
        tail[r, :len(caption)] = torch.as_tensor(list(caption), dtype=ids.dtype)
        real[r, :len(caption)] = True
    full = {}
    for key, value in inputs.items():
        if key == "labels":
            continue
        if key == "input_ids":
            value = torch.cat([ids, tail], 1)
        elif (isinstance(value, torch.Tensor) and value.shape == (batch, prompt_len)
              and not key.startswith(_NOT_LM_POSITIONS)):
            if key == "attention_mask":
                fill = real.to(value.dtype)
            elif key == "token_type_ids":
                fill = torch.ones_like(tail, dtype=value.dtype)
            elif key == "mm_token_type_ids":
                fill = torch.zeros_like(tail, dtype=value.dtype)
            else:
                fill = value[:, -1:].expand(-1, longest)
            value = torch.cat([value, fill], 1)
        full[key] = value
    return full, prompt_len, longest


@torch.no_grad()
def teacher_forced_activations(vlm, inputs: dict, generated_ids: list[int],
                               steps: list[int]) -> torch.Tensor:
    """``Float[Tensor, "len(steps) L F"]``: activations at the positions producing ``steps``
    when the caption ``generated_ids`` is fed whole (one forward, no generation).

    ``inputs`` are ``vlm.inputs([image])``. Equals the generation-time activations of the
    same caption (the KV cache changes nothing); under an intervention (e.g. permuted
    image tokens) it reads the units at the original caption's steps even when the
    model would now say something else.
    """
    full, prompt_len, _ = append_captions(inputs, [generated_ids])
    positions = torch.tensor(steps, device=full["input_ids"].device) + prompt_len - 1
    rows: list[torch.Tensor] = []
    handles = [vlm.down_proj(layer).register_forward_pre_hook(
        lambda m, args: rows.append(args[0][0, positions].detach())) for layer in range(vlm.n_layers)]
    try:
        vlm.model(**full)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(rows, 1)
