"""The text twin of a noun's multi-modal neurons: the units that write it with no image at all.

A language model pretrained on text already had units that write " dog" before it saw an
image. Here each noun is identified from a text-only prompt — the paper's prompt with the
image removed, the answer ``An image of a dog`` teacher-forced — with the same contribution
score (``a · W_U[t] · W_out``) at the step that predicts the noun, and its top-``k`` units are
compared with the image-driven top-``k`` of a ``find_neurons`` table (pooled over images as
:func:`~mmneurons_utils.identify.units_of` does).

Baselines: ``k`` uniformly random units (chance is ``k / (L · F)``), and the text units of the
*other* nouns (does the overlap name this noun, or just the units every noun uses?).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..model import architectures as A
from ..method.identification import units_of
from ..model.nouns import locate_nouns
from ..method.scoring import contribution_scores, random_units, top_units
from ..model.trace import trace_down_proj


def text_prompt(vlm, noun: str) -> str:
    """The model's own prompt with its image placeholder removed, answered ``a/an <noun>``."""
    image = getattr(vlm.processor, "image_token", "<image>")
    image = getattr(image, "content", image)
    head = vlm.prompt().replace(f"{image}\n", "").replace(image, "")
    return f"{head} {'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _text_decoder(vlm) -> torch.nn.Module:
    """The language model's decoder stack (the module that owns the layers): it runs on text
    alone for every family, where the whole model may insist on pixel values."""
    for path in vlm.arch.layers:
        parent = path.rsplit(".", 1)[0]
        try:
            return A.resolve(vlm.model, parent)
        except AttributeError:
            continue
    raise AttributeError(f"{vlm.name}: no decoder found at {vlm.arch.layers}")


@torch.no_grad()
def text_units(vlm, noun: str, k: int) -> np.ndarray:
    """``Int[ndarray, "K 2"]``: the top-``k`` contribution units for ``noun`` at the step that
    predicts it in :func:`text_prompt` (no image)."""
    enc = vlm.tokenizer(text_prompt(vlm, noun), return_tensors="pt").to(vlm.device)
    ids = enc["input_ids"][0].tolist()
    (located,) = locate_nouns(vlm.tokenizer, ids[-4:], [noun])  # the answer's last few tokens
    position = len(ids) - 4 + located.step - 1                   # the logits that predict it
    with trace_down_proj(vlm, retain_input=True) as traces:
        _text_decoder(vlm)(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    acts = torch.stack([traces[l].input[0, position] for l in range(vlm.n_layers)])   # (L, F)
    units, _ = top_units(contribution_scores(vlm, acts, located.token_id), k)
    return units


def _share(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(|a ∩ b| / |a|, Jaccard)`` of two unit lists ``Int[ndarray, "K 2"]``."""
    sa, sb = set(map(tuple, a.tolist())), set(map(tuple, b.tolist()))
    shared = len(sa & sb)
    return shared / len(sa), shared / len(sa | sb)


def text_twin_overlap(vlm, table: pd.DataFrame, k: int = 10, nouns: Sequence[str] | None = None,
                      seed: int = 0) -> pd.DataFrame:
    """One row per noun: ``retained`` (share of its image-driven top-``k`` units that are also
    its text-only top-``k``), ``jaccard``, the same two for ``k`` random units, ``other_nouns``
    (mean share retained by the other nouns' text units), ``n_images`` and ``chance`` (k/(L·F))."""
    nouns = list(nouns) if nouns is not None else sorted(table.loc[table.method == "contribution", "noun"].unique())
    text = {noun: text_units(vlm, noun, k) for noun in nouns}
    rows = []
    for i, noun in enumerate(nouns):
        image = units_of(table, noun, k)
        retained, jaccard = _share(image, text[noun])
        rand_retained, rand_jaccard = _share(image, random_units(vlm.n_layers, vlm.d_ff, k, [seed, i]))
        others = [_share(image, text[m])[0] for m in nouns if m != noun]
        rows.append(dict(noun=noun, k=k, retained=retained, jaccard=jaccard,
                         random_retained=rand_retained, random_jaccard=rand_jaccard,
                         other_nouns=float(np.mean(others)) if others else float("nan"),
                         n_images=int(table.loc[(table.noun == noun) & (table.method == "contribution"),
                                                "image"].nunique()),
                         chance=k / (vlm.n_layers * vlm.d_ff)))
    return pd.DataFrame(rows)
