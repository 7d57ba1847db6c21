"""The official code's identification, reimplemented to be timed beside ours (``mmneurons bench``).

This is the pipeline of the paper's code (github.com/opanhw/MM_Neurons: ``src/preparation.py``,
``src/trainer.py: trainer.find_mm_neurons``, and the ``forward`` / ``prepare_inputs_for_generation``
of its patched ``open_source_model/LLaVA/llava_llama.py`` and
``open_source_model/InstructBlip/modeling_instructblip.py``), with its semantics, for timing and
comparison only; the package's method is :func:`mmneurons_utils.method.identify.find_neurons`.

What it does, as the official code does it:

* **Preparation** (``preparation.py``, a separate script there; :func:`prepare_official` here,
  timed apart): per decoder layer the whole projection ``W_outᵀ · W_Uᵀ`` — ``(F, V)``, computed in
  float32, kept in float16 — and each unit's top-10 tokens from sorting its row.
* **Batch size 1**: one image at a time.
* **No KV cache**: the patched ``prepare_inputs_for_generation`` drops ``past_key_values``, so each
  generated token re-runs the *whole* forward — vision tower (InstructBLIP: and the Q-Former),
  projector and the language model over the full sequence, with logits at every position. Here:
  a greedy loop that calls ``vlm.model(**inputs)`` on the growing sequence (:func:`generate_no_cache`).
* **Gate-only activation**: a forward hook on every layer's ``mlp.act_fn`` keeps
  ``act_fn(gate(x))[0, -1]`` as float16 on the CPU at every forward (``last_activation``), stacked to
  ``(S, L, F)``. This is *not* the coefficient of the write vector (that is ``act_fn(gate(x)) · up(x)``,
  the ``down_proj`` input our capture records).
* **Nouns**: the caption's nouns, sorted (``sorted(set(...))``); each noun's first sub-token is the
  first id of the noun tokenized alone, and its step is that id's first index in the generated ids.
  The official code tags nouns with CoreNLP; here they come from ``vlm.nouns_of`` (the package's
  tagger / noun vocabulary), so both pipelines start from the same words.
* **Scores**: for each noun, per layer, ``act[step, l] * projection[l][:, token]`` in float16; all
  ``L × F`` scores sorted descending; the ranked ``(layer, unit)`` list built with ``.item()`` per
  entry; each kept unit's top tokens looked up in the prepared table.

Left out (each would only add to the official time, so the measured speed-up is a lower bound):
CoreNLP, the second image preprocessing, saving images / tensors / JSON, the LLaVA forward's
float16 copy of every layer's full-sequence activations and the heatmaps drawn from it, and keeping
10,000 ranked units per noun (the official list) instead of the ``top_k`` ours keeps. The official
loop pairs ``noun_tokens`` (all nouns) with ``nouns`` (those found in the ids), which misaligns
when a noun's first sub-token is not among the generated ids; here each noun keeps its own token.
Placeholder tokens are suppressed as in ``VLM.describe`` so that both pipelines make the same
captions (the official code does not suppress them; a placeholder generated there breaks the next
forward's image-feature count).

Shapes (the package's letters): ``L`` layers, ``F`` units per layer, ``V`` vocabulary, ``S`` steps,
``K`` kept units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..model import architectures as A
from ..model.trace import TraceDict

OFFICIAL_DTYPE = torch.float16   # the official projection, activations and scores


class OfficialMismatch(AssertionError):
    """The official reimplementation and ``find_neurons`` disagree on a caption or its nouns."""


@dataclass
class OfficialTables:
    """What ``preparation.py`` writes: per layer the ``(F, V)`` projection (``W_outᵀ · W_Uᵀ``, float16)
    and every unit's top token ids ``Int[Tensor, "L F 10"]``."""

    projection: list[torch.Tensor]
    top_tokens: torch.Tensor


@dataclass
class OfficialNoun:
    noun: str
    step: int
    token_id: int
    units: np.ndarray            # Int[ndarray, "K 2"], best first
    scores: np.ndarray           # Float[ndarray, "K"] (float16 values)
    top_tokens: list[list[int]]  # each kept unit's top token ids (the prepared table)


@dataclass
class OfficialResult:
    text: str
    token_ids: list[int]         # generated ids, the stop token included when generated
    nouns: list[OfficialNoun] = field(default_factory=list)


@torch.no_grad()
def prepare_official(vlm, n_top_tokens: int = 10, rows: int = 100) -> OfficialTables:
    """``preparation.py``: every layer's full ``W_out · W_U`` projection and each unit's top tokens
    (rows sorted ``rows`` units at a time, as the official ``--bz``)."""
    w_u = vlm.lm_head.weight.float().T                                    # (D, V)
    projection, top = [], []
    for layer in range(vlm.n_layers):
        w = vlm.down_proj(layer).weight.float().T                         # (F, D)
        prob = (w @ w_u).to(OFFICIAL_DTYPE)                               # (F, V)
        projection.append(prob)
        top.append(torch.cat([prob[i:i + rows].sort(descending=True, dim=1).indices[:, :n_top_tokens]
                              for i in range(0, prob.shape[0], rows)]))
    return OfficialTables(projection=projection, top_tokens=torch.stack(top))


@torch.no_grad()
def generate_no_cache(vlm, image: Image.Image, max_new_tokens: int = 20
                      ) -> tuple[list[int], torch.Tensor]:
    """Greedy caption of one image with no KV cache: every step runs the full model (vision
    tower included) on the whole sequence. Returns the generated ids (the stop token included
    when reached) and the gate-only activations at each step's last position,
    ``Float16[Tensor, "S L F"]`` on the CPU (``S`` = forwards run)."""
    eos = vlm.model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) | {vlm.tokenizer.pad_token_id}
    suppress = sorted(set(vlm.model.generation_config.suppress_tokens or [])
                      | set(vlm.placeholder_token_ids))
    inputs = vlm.inputs([image])
    last: list[list[torch.Tensor]] = []     # per forward: one (F,) per layer
    act = [None] * vlm.n_layers

    def keep(output, x, layer):             # the official forward_hook: act[n].append(output)
        act[layer] = output.detach()

    modules = {layer: A.resolve(vlm.layers[layer], vlm.arch.act_fn) for layer in range(vlm.n_layers)}
    generated: list[int] = []
    with TraceDict(modules, edit_output=keep):
        for _ in range(max_new_tokens):
            logits = vlm.model(**inputs, use_cache=False).logits          # (1, T, V)
            last.append([a[0, -1].to(OFFICIAL_DTYPE).cpu() for a in act])
            scores = logits[0, -1].float()
            if suppress:
                scores[suppress] = -float("inf")
            token = int(scores.argmax())
            generated.append(token)
            if token in stop:
                break
            step = torch.tensor([[token]], device=inputs["input_ids"].device)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], step], 1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"],
                                                  torch.ones_like(step)], 1)
    return generated, torch.stack([torch.stack(row) for row in last])


def official_noun_steps(vlm, text: str, token_ids: Sequence[int]) -> list[tuple[str, int, int]]:
    """``(noun, step, token_id)`` the official way: sorted nouns, each noun's first sub-token
    (tokenized alone) and that id's first index among the generated ids.

    On a byte-level BPE vocabulary (GPT-2 style, e.g. smol-llava's SmolLM2) a word tokenized
    alone has no ``Ġ`` while the caption's word has one, so the official matching finds no noun
    at all; there the noun is tokenized with its leading space (what sentencepiece's prefix
    space gives LLaMA's tokenizer), so that the bench times the same work on both sides."""
    nouns = sorted(set(vlm.nouns_of(text)))
    ids = list(token_ids)
    found = []
    for noun in nouns:
        for word in (noun, " " + noun):
            token = vlm.tokenizer(word, add_special_tokens=False)["input_ids"][0]
            if token in ids:
                found.append((noun, ids.index(token), token))
                break
    return found


@torch.no_grad()
def official_scores(tables: OfficialTables, activations: torch.Tensor, step: int,
                    token_id: int) -> torch.Tensor:
    """``Float16[Tensor, "L F"]``: ``act[step, l] * projection[l][:, token]``, layer by layer."""
    n_layers, d_ff = activations.shape[1], activations.shape[2]
    scores = torch.zeros((n_layers, d_ff), dtype=OFFICIAL_DTYPE)
    for layer in range(n_layers):
        act = activations[step, layer]
        scores[layer] += act * tables.projection[layer][:, token_id].flatten()
    return scores


def official_find(vlm, images: Sequence[Image.Image], tables: OfficialTables, top_k: int = 50,
                  max_new_tokens: int = 20) -> list[OfficialResult]:
    """``find_mm_neurons`` over ``images``, one at a time: caption without cache, nouns, scores,
    the ranked units (``top_k`` kept) and their top tokens from ``tables``."""
    results = []
    for image in images:
        ids, activations = generate_no_cache(vlm, image, max_new_tokens)
        text = vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
        result = OfficialResult(text=text, token_ids=ids)
        for noun, step, token in official_noun_steps(vlm, text, ids):
            scores = official_scores(tables, activations, step, token)
            order = scores.flatten().sort(descending=True, dim=0).indices[:top_k]
            d_ff = scores.shape[1]
            units = [[x.item() // d_ff, x.item() % d_ff] for x in order]
            result.nouns.append(OfficialNoun(
                noun=noun, step=step, token_id=token, units=np.asarray(units, dtype=np.int64),
                scores=np.asarray([scores[l][u].item() for l, u in units], dtype=np.float32),
                top_tokens=[tables.top_tokens[l, u].tolist() for l, u in units]))
        results.append(result)
    return results


def check_same_nouns(vlm, captions, official: Sequence[OfficialResult]) -> int:
    """Raise :class:`OfficialMismatch` unless ``captions`` (``VLM.describe``'s) and ``official``
    hold the same generated ids (up to the stop token) and the same ``(noun, step, token_id)``
    for every image; returns the number of nouns."""
    if len(captions) != len(official):
        raise OfficialMismatch(f"{len(captions)} captions against {len(official)} official results")
    eos = vlm.model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) | {vlm.tokenizer.pad_token_id}
    n = 0
    for i, (caption, result) in enumerate(zip(captions, official)):
        ids = result.token_ids
        ids = ids[: next((j for j, t in enumerate(ids) if t in stop), len(ids))]
        ours = sorted((t.noun, t.step, t.token_id) for t in caption.noun_tokens)
        theirs = sorted((x.noun, x.step, x.token_id) for x in result.nouns)
        if list(caption.token_ids) != ids or ours != theirs:
            raise OfficialMismatch(f"image {i}: ours {caption.text!r} {ours} ≠ official "
                                   f"{result.text!r} {theirs}")
        n += len(ours)
    return n
