"""Invariance: do the same neurons come back when the image changes but the noun does not?

* **Region (position) invariance** (paper §4): the image tokens the language model
  reads are shuffled (a seeded permutation of the projector's output rows, i.e.
  after the vision encoder and projector, before the LLM), and the neurons are
  re-identified. ``retained`` is the share of the original top-``k`` units that are
  still in the top-``k``, read at the original caption's noun step (teacher forcing,
  so it is defined even when the shuffled model says something else). Whether the
  greedy caption survives is reported beside it (``caption_same``, ``noun_kept``).
  The ``random`` row is the chance level: the share of a seeded random ``k``-set
  that lands in the shuffled run's contribution top-``k`` (≈ ``k / units``).
* **Cross-image invariance**: for a noun said about several images, how much the
  images' top-``k`` sets agree: mean pairwise Jaccard among the noun's images
  (``jaccard_same``) against pairs of this noun's and other nouns' sets
  (``jaccard_different``), and ``top_unit_share``, the share of the noun's images
  whose top-``k`` holds the noun's most frequent unit.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import combinations
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from . import architectures as A
from . import scoring
from .capture import teacher_forced_activations
from .identify import check_top_k
from .stats import jaccard


@contextmanager
def permuted_image_tokens(vlm, permutation) -> Iterator[None]:
    """Within the block, the LLM reads the image tokens in ``permutation`` order.

    ``permutation``: ``Int[n_image_tokens]``, a permutation of ``0 … n-1``; the
    projector's output ``Float[Tensor, "batch n D"]`` becomes ``out[:, permutation]``.
    """
    projector = A.resolve(vlm.model, vlm.arch.image_projector)
    permutation = torch.as_tensor(np.asarray(permutation), dtype=torch.long)

    def shuffle(module, args, out):
        if out.shape[-2] != len(permutation):
            raise ValueError(f"permutation has {len(permutation)} entries for "
                             f"{out.shape[-2]} image tokens")
        return out[..., permutation.to(out.device), :]

    handle = projector.register_forward_hook(shuffle)
    try:
        yield
    finally:
        handle.remove()


def n_image_tokens(vlm) -> int:
    """Rows of the projector's output for one image (what ``permuted_image_tokens`` permutes)."""
    from PIL import Image

    projector = A.resolve(vlm.model, vlm.arch.image_projector)
    seen = []
    handle = projector.register_forward_hook(lambda m, a, out: seen.append(out.shape[-2]))
    try:
        with torch.no_grad():
            vlm.model(**vlm.inputs([Image.new("RGB", (64, 64))]))
    finally:
        handle.remove()
    return seen[0]


def region_invariance(vlm, images, top_k: int = 10, seed: int = 0,
                      methods: Sequence[str] = ("contribution", "gradient", "random"),
                      max_new_tokens: int = 20, progress: bool = False) -> pd.DataFrame:
    """One row per (image, noun, method): ``retained``, ``caption_same``, ``noun_kept``.

    Each image gets its own permutation, drawn from ``(seed, image index)``.
    """
    from tqdm.auto import tqdm

    check_top_k(vlm, top_k)
    captions = vlm.describe(list(images), max_new_tokens=max_new_tokens, capture="down_proj_input")
    n_tokens = n_image_tokens(vlm)
    rows = []
    for index, (image, caption) in enumerate(tqdm(list(zip(images, captions)),
                                                  desc="region invariance", disable=not progress)):
        targets = caption.noun_tokens
        if not targets:
            continue
        inputs = vlm.inputs([image])
        before = _scores(vlm, inputs, caption, targets, methods)
        permutation = np.random.default_rng([seed, index]).permutation(n_tokens)
        with permuted_image_tokens(vlm, permutation):
            shuffled = vlm.describe([image], max_new_tokens=max_new_tokens)[0]
            after = _scores(vlm, inputs, caption, targets, methods)
        for n, target in enumerate(targets):
            common = dict(image=index, noun=target.noun, caption_same=shuffled.text == caption.text,
                          noun_kept=target.noun in shuffled.nouns)
            for method in methods:
                if method == "random":
                    chance = scoring.random_units(vlm.n_layers, vlm.d_ff, top_k, [seed, index, n])
                    kept = _overlap(chance, after["contribution"][n], top_k)
                else:
                    kept = _overlap(scoring.top_units(before[method][n], top_k)[0],
                                    after[method][n], top_k)
                rows.append(dict(common, method=method, retained=kept))
    return pd.DataFrame(rows, columns=["image", "noun", "method", "retained", "caption_same",
                                       "noun_kept"])


def _scores(vlm, inputs, caption, targets, methods) -> dict[str, list[torch.Tensor]]:
    """Per method (random uses contribution), one ``Float[Tensor, "L F"]`` per target."""
    out = {}
    steps = teacher_forced_activations(vlm, inputs, caption.token_ids, [t.step for t in targets])
    out["contribution"] = [scoring.contribution_scores(vlm, steps[n], t.token_id)
                           for n, t in enumerate(targets)]
    if "gradient" in methods:
        out["gradient"] = scoring.gradient_scores(vlm, inputs, caption.token_ids,
                                                  [(t.step, t.token_id) for t in targets])
    return out


def _overlap(units: np.ndarray, scores: torch.Tensor, k: int) -> float:
    """Share of ``units`` (``Int[k, 2]``) inside the top-``k`` of ``scores``."""
    top = {tuple(u) for u in scoring.top_units(scores, k)[0].tolist()}
    return sum(tuple(u) in top for u in np.asarray(units).tolist()) / len(units)


def cross_image_invariance(table: pd.DataFrame, k: int = 10, nouns: Sequence[str] | None = None,
                           max_pairs: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (method, noun): ``n_images``, ``jaccard_same``, ``jaccard_different``,
    ``top_unit_share`` and ``status`` (``"ok"``, or why the noun has no numbers, e.g.
    ``"no images contain 'zebra'"``). ``table``: ``find_neurons`` rows over many images.

    ``nouns``: the nouns to report (default: every noun in the table). Pairs are
    sampled (seeded) when there are more than ``max_pairs``.
    """
    rng = np.random.default_rng(seed)
    top = table[table["rank"] < k]
    rows = []
    for method, part in top.groupby("method", sort=False):
        sets = {key: frozenset(zip(g.layer, g.unit)) for key, g in part.groupby(["noun", "image"])}
        by_noun: dict[str, list[frozenset]] = {}
        for (noun, _), units in sets.items():
            by_noun.setdefault(noun, []).append(units)
        for noun in (nouns if nouns is not None else sorted(by_noun)):
            own = by_noun.get(noun, [])
            row = dict(method=method, noun=noun, n_images=len(own), jaccard_same=np.nan,
                       jaccard_different=np.nan, top_unit_share=np.nan)
            if len(own) < 2:
                row["status"] = (f"no images contain {noun!r}" if not own else
                                 f"only one image contains {noun!r}; need at least 2")
                rows.append(row)
                continue
            others = [s for other, group in by_noun.items() if other != noun for s in group]
            same = _sample(list(combinations(range(len(own)), 2)), max_pairs, rng)
            row["jaccard_same"] = float(np.mean([jaccard(own[i], own[j]) for i, j in same]))
            if others:
                cross = _sample([(i, j) for i in range(len(own)) for j in range(len(others))],
                                max_pairs, rng)
                row["jaccard_different"] = float(np.mean([jaccard(own[i], others[j])
                                                          for i, j in cross]))
            counts = pd.Series([u for s in own for u in s]).value_counts()
            row["top_unit_share"] = float(counts.iloc[0] / len(own))
            row["status"] = "ok"
            rows.append(row)
    return pd.DataFrame(rows, columns=["method", "noun", "n_images", "jaccard_same",
                                       "jaccard_different", "top_unit_share", "status"])


def _sample(pairs: list, limit: int, rng) -> list:
    if len(pairs) <= limit:
        return pairs
    return [pairs[i] for i in rng.choice(len(pairs), size=limit, replace=False)]
