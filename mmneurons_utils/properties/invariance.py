"""Invariance: do the same neurons come back when the image changes but the noun does not?

* **Region (position) invariance** (paper §4): the image tokens the language model
  reads are shuffled (a seeded permutation of the projector's output rows, i.e.
  after the vision encoder and projector, before the LLM), and the neurons are
  re-identified. ``retained`` is the share of the original top-``k`` units that are
  still in the top-``k``. Where the shuffled caption still says the noun, the units
  are read at the step where *it* says it (teacher forcing the shuffled caption:
  ``read_at="shuffled"``); otherwise at the original caption's noun step (teacher
  forcing the original caption under the shuffle: ``read_at="original"``), so the
  number is defined even when the model now says something else. ``caption_same`` and
  ``noun_kept`` are reported beside it, and ``n_nouns`` (the nouns of the clean
  caption) stratifies the result: scene captions list objects left to right, so with
  several objects a shuffle reorders the nouns, and the single-noun images are the
  clean test. An identity permutation gives exactly 1. The ``random`` row is the
  chance level: the share of a seeded random ``k``-set that lands in the shuffled
  run's contribution top-``k`` (≈ ``k / units``).
* **Cross-image invariance**: for a noun said about several images, how much the
  images' top-``k`` sets agree: mean pairwise Jaccard among the noun's images
  (``jaccard_same``) against pairs of this noun's and other nouns' sets
  (``jaccard_different``), and ``top_unit_share``, the share of the noun's images
  whose top-``k`` holds the noun's most frequent unit.
"""

from __future__ import annotations

from contextlib import contextmanager
from itertools import combinations
from types import SimpleNamespace
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from ..model import architectures as A
from ..method import scoring
from ..model.teacher_forcing import teacher_forced_activations
from ..method.identification import Identification
from ..method.identify import check_top_k, logit_weights, unit_scores
from ..model.nouns import locate_nouns
from .stats import jaccard, of_methods
from ..model.trace import Trace


@contextmanager
def permuted_image_tokens(vlm, permutation) -> Iterator[None]:
    """Within the block, the LLM reads the image tokens in ``permutation`` order.

    ``permutation``: ``Int[ndarray, "I"]``, a permutation of ``0 … I-1`` (``I`` =
    ``vlm.image_projector_rows``); the projector's output ``Float[Tensor, "B I D"]`` becomes
    ``out[:, permutation]``.
    """
    projector = A.resolve(vlm.model, vlm.arch.image_projector)
    permutation = torch.as_tensor(np.asarray(permutation), dtype=torch.long)

    def shuffle(out, x):
        if out.shape[-2] != len(permutation):
            raise ValueError(f"permutation has {len(permutation)} entries for "
                             f"{out.shape[-2]} image tokens")
        return out[..., permutation.to(out.device), :]

    with Trace(projector, edit_output=shuffle):
        yield


def region_invariance(vlm, images, ident: Identification, top_k: int = 10, seed: int = 0,
                      methods: Sequence[str] = ("contribution", "gradient", "random"),
                      max_new_tokens: int | None = None, progress: bool = False,
                      permutation: Callable[[int, int], np.ndarray] | None = None) -> pd.DataFrame:
    """One row per (image, noun, method): ``retained``, ``caption_same``, ``noun_kept``,
    ``read_at`` (``"shuffled"`` or ``"original"``: whose caption the shuffled units were
    read at) and ``n_nouns`` (nouns of the clean caption).

    ``images``: PIL images; ``ident``: their :class:`Identification` (same order; e.g.
    ``ident.subset(range(12))`` of a larger run): its captions are the clean ones (nothing is
    captioned again). The clean units are read by teacher forcing the clean caption, as the
    shuffled ones are. ``max_new_tokens``: of the shuffled captions (default: the
    identification's). Each image gets its own permutation, drawn from ``(seed, image index)``;
    ``permutation(index, n_tokens)`` replaces that draw (e.g. the identity, for a check).
    """
    from tqdm.auto import tqdm

    check_top_k(vlm, top_k)
    images = list(images)
    ident.check_made_on(images)
    if max_new_tokens is None:
        max_new_tokens = ident.settings.get("max_new_tokens", 20)
    scored = [m for m in dict.fromkeys(("contribution",) + tuple(methods)) if m != "random"]
    captions = ident.captions
    n_tokens = vlm.image_projector_rows
    rows = []
    for index, (image, caption) in enumerate(tqdm(list(zip(images, captions)),
                                                  desc="region invariance", disable=not progress)):
        targets = caption.noun_tokens
        if not targets:
            continue
        before = _read(vlm, image, caption.token_ids, targets, scored)
        order = (permutation(index, n_tokens) if permutation is not None
                 else np.random.default_rng([seed, index]).permutation(n_tokens))
        with permuted_image_tokens(vlm, order):
            shuffled = vlm.describe([image], max_new_tokens=max_new_tokens)[0]
            moved = {t.noun: t for t in locate_nouns(vlm.tokenizer, shuffled.token_ids,
                                                     [t.noun for t in targets])}
            kept = [t for t in targets if t.noun in moved]
            lost = [t for t in targets if t.noun not in moved]
            after = {}
            if kept:
                read = _read(vlm, image, shuffled.token_ids, [moved[t.noun] for t in kept], scored)
                after.update({(t.noun, m): read[m][n] for m in scored for n, t in enumerate(kept)})
            if lost:
                read = _read(vlm, image, caption.token_ids, lost, scored)
                after.update({(t.noun, m): read[m][n] for m in scored for n, t in enumerate(lost)})
        for n, target in enumerate(targets):
            common = dict(image=index, noun=target.noun, n_nouns=len(targets),
                          caption_same=shuffled.text == caption.text,
                          noun_kept=target.noun in moved,
                          read_at="shuffled" if target.noun in moved else "original")
            for method in methods:
                if method == "random":
                    chance = scoring.random_units(vlm.n_layers, vlm.d_ff, top_k, [seed, index, n])
                    share = _overlap(chance, after[(target.noun, "contribution")], top_k)
                else:
                    share = _overlap(scoring.top_units(before[method][n], top_k)[0],
                                     after[(target.noun, method)], top_k)
                rows.append(dict(common, method=method, retained=share))
    return pd.DataFrame(rows, columns=["image", "noun", "n_nouns", "method", "retained",
                                       "caption_same", "noun_kept", "read_at"])


def _read(vlm, image, token_ids, targets, methods) -> dict[str, list[torch.Tensor]]:
    """Per scoring method, one ``Float[Tensor, "L F"]`` per target, teacher-forcing the
    caption ``token_ids`` (under whatever intervention is active)."""
    steps = teacher_forced_activations(vlm, vlm.inputs([image]), token_ids, [t.step for t in targets])
    caption = SimpleNamespace(token_ids=list(token_ids))
    return unit_scores(vlm, image, caption, targets, methods, logit_weights(vlm, targets),
                       steps=list(steps))


def _overlap(units: np.ndarray, scores: torch.Tensor, k: int) -> float:
    """Share of ``units`` (``Int[ndarray, "N 2"]``) inside the top-``k`` of ``scores``
    (``Float[Tensor, "L F"]``)."""
    top = {tuple(u) for u in scoring.top_units(scores, k)[0].tolist()}
    return sum(tuple(u) in top for u in np.asarray(units).tolist()) / len(units)


def cross_image_invariance(ident: Identification, k: int = 10, nouns: Sequence[str] | None = None,
                           max_pairs: int = 2000, seed: int = 0,
                           methods: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per (method, noun): ``n_images``, ``jaccard_same``, ``jaccard_different``,
    ``top_unit_share`` and ``status`` (``"ok"``, or why the noun has no numbers, e.g.
    ``"no images contain 'zebra'"``). ``ident``: the :class:`Identification` of many images;
    ``methods``: only these of its methods (default: all).

    ``nouns``: the nouns to report (default: every noun it holds). Pairs are
    sampled (seeded) when there are more than ``max_pairs``.
    """
    rng = np.random.default_rng(seed)
    table = of_methods(ident.table, methods)
    top = table[table["rank"] < k]
    rows = []
    for method, part in top.groupby("method", sort=False):
        if "draw" in part and part["draw"].notna().any():    # the selection null: the mean over draws
            per_draw = pd.concat([_cross_rows(method, draw, k, nouns, max_pairs, rng)
                                  for _, draw in part.groupby("draw", sort=True)], ignore_index=True)
            means = per_draw.groupby("noun", sort=False)[["jaccard_same", "jaccard_different",
                                                           "top_unit_share"]].mean()
            first = per_draw.drop_duplicates("noun").set_index("noun")
            first[means.columns] = means
            rows += first.reset_index().to_dict("records")
            continue
        rows += _cross_rows(method, part, k, nouns, max_pairs, rng).to_dict("records")
    return pd.DataFrame(rows, columns=["method", "noun", "n_images", "jaccard_same",
                                       "jaccard_different", "top_unit_share", "status"])


def _cross_rows(method: str, part: pd.DataFrame, k: int, nouns, max_pairs: int, rng) -> pd.DataFrame:
    """:func:`cross_image_invariance`'s rows of one method's (one draw's) top-``k`` rows."""
    rows = []
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
