"""Teacher forcing: feed prompt + a given caption in one forward pass, no generation.

The one home of it in the package. Every reading "at the step that produced caption token
``j``" of a fixed caption goes through here: the clean logits of causal ablation, the
units read under a shuffle (region invariance), the gradient baselines' forward pass, and
the edit's loss. Rows are left-padded prompts (as :meth:`VLM.inputs` makes them) followed
by right-padded captions, so position ``prompt_len - 1 + j`` produces caption token ``j``
in every row.

Shapes (the package's letters, see :mod:`mmneurons_utils`): ``B`` batch (images), ``T``
sequence positions, ``S`` caption steps, ``L`` decoder layers, ``F`` units per layer
(``d_ff``), ``V`` vocabulary, ``N`` rows of a list.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .trace import trace_down_proj


# Per-position inputs that are not the language model's sequence (vision / Q-Former side).
_NOT_LM_POSITIONS = ("pixel_", "image_", "qformer_")


def append_captions(inputs: dict, captions, pad_id: int = 0) -> tuple[dict, int, int]:
    """Teacher-forcing inputs: the encoded prompts ``inputs`` (batch ``len(captions)``,
    left-padded as :meth:`VLM.inputs` makes them) with each caption's token ids appended,
    right-padded: ``(inputs, prompt_len, longest)``.

    Every per-position input (``Int[Tensor, "B T"]``) is extended as ``generate``
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


def teacher_forced_inputs(vlm, images, captions: Sequence[Sequence[int]]) -> tuple[dict, int, int]:
    """Model inputs for prompt + caption tokens of each image: ``(inputs, prompt_len, longest)``
    (see :func:`append_captions`)."""
    return append_captions(vlm.inputs(list(images)), captions, vlm.tokenizer.pad_token_id or 0)


def caption_logits(vlm, inputs: dict, prompt_len: int, longest: int) -> torch.Tensor:
    """``Float[Tensor, "B S V"]`` (float32, the model's device): the logits at every caption
    step of teacher-forced ``inputs`` (from :func:`teacher_forced_inputs`); row ``j`` produced
    caption token ``j``. Runs in the caller's grad mode (editing trains through it)."""
    return vlm.model(**inputs).logits[:, prompt_len - 1: prompt_len - 1 + longest].float()


@torch.no_grad()
def teacher_forced_logits(vlm, images, captions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per image ``Float[Tensor, "S V"]`` (float32, CPU): the logits at every step of its
    caption, teacher-forcing the given caption tokens in one batched forward."""
    full, prompt_len, longest = teacher_forced_inputs(vlm, images, captions)
    if longest == 0:
        return [torch.zeros(0, vlm.lm_head.out_features) for _ in captions]
    logits = caption_logits(vlm, full, prompt_len, longest)
    return [logits[r, :len(c)].cpu() for r, c in enumerate(captions)]


@torch.no_grad()
def teacher_forced_activations(vlm, inputs: dict, generated_ids: list[int],
                               steps: list[int]) -> torch.Tensor:
    """``Float[Tensor, "N L F"]`` (``N`` = ``len(steps)``): activations at the positions
    producing ``steps`` when the caption ``generated_ids`` is fed whole (one forward, no
    generation).

    ``inputs`` are ``vlm.inputs([image])``. Equals the generation-time activations of the
    same caption (the KV cache changes nothing); under an intervention (e.g. permuted
    image tokens) it reads the units at the original caption's steps even when the
    model would now say something else.
    """
    full, prompt_len, _ = append_captions(inputs, [generated_ids])
    positions = torch.tensor(steps, device=full["input_ids"].device) + prompt_len - 1
    rows: dict[int, torch.Tensor] = {}    # keep only the asked-for positions, not (T, F) per layer

    def read(x, layer):
        rows[layer] = x[0, positions.to(x.device)].detach().to(vlm.device)

    with trace_down_proj(vlm, edit_input=read):
        vlm.model(**full)
    return torch.stack([rows[layer] for layer in range(vlm.n_layers)], 1)
