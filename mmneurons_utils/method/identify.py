"""``find_neurons``: the multi-modal neurons of every noun a model says about an image.

Data flow: image → ``VLM.describe(activation=...)`` (one generation, activations
recorded with the KV cache on) → nouns and the step of each → per-noun unit
scores (:mod:`mmneurons_utils.method.scoring`) → the top ``k`` units → a tidy table.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from . import scoring
from .identification import Identification
from ..model.nouns import locate_nouns

METHODS = ("contribution", "gradient", "gradient_image", "random")
GRADIENT_METHODS = {"gradient": "noun", "gradient_image": "image"}   # method → where it attributes
COLUMNS = ["image", "noun", "token_id", "step", "method", "rank", "layer", "unit", "score",
           "polarity", "top_tokens", "noun_rank"]


class NounNotInCaption(ValueError):
    """An asked-for noun is not in the generated caption."""


def check_top_k(vlm, top_k) -> int:
    total = vlm.n_layers * vlm.d_ff
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= total:
        raise ValueError(f"top_k must be an integer in 1 … {total} (the model's "
                         f"{vlm.n_layers} × {vlm.d_ff} units), got {top_k!r}")
    return top_k


def find_neurons(vlm, image: Image.Image | Sequence[Image.Image], method: str = "contribution",
                 top_k: int = 50, nouns: Sequence[str] | None = None, seed: int = 0,
                 n_top_tokens: int = 10, max_new_tokens: int = 20, batch_size: int = 16,
                 activation: str = "down_proj_input", progress: bool = False,
                 image_indices: Sequence[int] | None = None,
                 captions: Sequence | None = None) -> pd.DataFrame:
    """Top-``top_k`` units for each noun of each image's generated caption.

    ``image``: one PIL image or a list. ``nouns``: restrict to these (each must be in
    the caption). ``method``: ``contribution`` (the paper), ``gradient``
    (gradient × activation at the noun step), ``gradient_image`` (attribution at the
    image-token positions, Schwettmann et al.) or ``random`` (``seed``-ed uniform units;
    their ``score`` is their contribution score, for reference; each (image, noun) draws
    its own set). See :mod:`mmneurons_utils.method.scoring`.
    ``image_indices``: the numbers written to the ``image`` column and keying the random
    draws (default ``0 … n-1``); batch runs pass each image's position in the whole run.
    ``captions``: the images' captions from ``vlm.describe(images, activation=activation)``
    if already made (e.g. to score several methods on one generation); else made here.

    Returns a long-form DataFrame, one row per (image, noun, neuron), columns
    ``image, noun, token_id, step, method, rank, layer, unit, score, polarity, top_tokens,
    noun_rank``: ``rank`` 0 is the top unit; ``polarity`` (±1) is the sign of the unit's
    coefficient ``a`` at the noun's step, the direction in which it writes; ``top_tokens``
    are the top of the unit's logit lens in that direction, ``p · (W_U · W_out[l][:, i])``,
    and ``noun_rank`` is the noun token's rank in that lens (0 = the unit's top token).
    """
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    check_top_k(vlm, top_k)
    images = [image] if isinstance(image, Image.Image) else list(image)
    indices = list(range(len(images))) if image_indices is None else list(image_indices)
    if len(indices) != len(images):
        raise ValueError(f"image_indices has {len(indices)} entries for {len(images)} images")
    if captions is None:
        captions = vlm.describe(images, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                activation=activation, progress=progress)
    elif len(captions) != len(images) or any(c.activations is None for c in captions):
        raise ValueError(f"captions must be {len(images)} captions made with activation={activation!r}")
    targets = [_targets(vlm, caption, nouns) for caption in captions]
    weights = logit_weights(vlm, [t for ts in targets for t in ts])
    picks = []  # (image index, target, units (K, 2), scores (K,), polarity (K,))
    for index, img, caption, image_targets in tqdm(list(zip(indices, images, captions, targets)),
                                                   desc=f"find ({method})", disable=not progress):
        ranked = rank_units(vlm, img, caption, image_targets, (method,), top_k, [seed, index],
                            weights=weights)[method]
        picks += [(index, target, *r) for target, r in zip(image_targets, ranked)]
    rows = _rows(vlm, method, picks, n_top_tokens)
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["captions"] = [c.text for c in captions]
    return table


def _rows(vlm, method: str, picks: list, n_top_tokens: int) -> list[tuple]:
    """The table's rows of ``picks`` (``(image, target, units (K, 2), scores (K,), polarity
    (K,))`` each), with every unit's top tokens and noun rank from one pass of the lens."""
    empty = np.zeros((0, 2), dtype=np.int64)
    all_units = np.concatenate([p[2] for p in picks]) if picks else empty
    signs = np.concatenate([p[4] for p in picks]) if picks else np.zeros(0, dtype=np.int64)
    nouns_of_rows = np.concatenate([np.full(len(p[2]), p[1].token_id) for p in picks]) if picks \
        else np.zeros(0, dtype=np.int64)
    top_ids, noun_ranks = scoring.unit_logit_lens(vlm, all_units, n_top_tokens, signs,
                                                  nouns_of_rows)    # one pass for all rows
    rows, r = [], 0
    for index, target, units, scores, polarity in picks:
        for rank, ((layer, unit), score, sign) in enumerate(zip(units, scores, polarity)):
            rows.append((index, target.noun, target.token_id, target.step, method, rank,
                         int(layer), int(unit), float(score), int(sign),
                         vlm.token_strings(top_ids[r]), int(noun_ranks[r])))
            r += 1
    return rows


def logit_weights(vlm, targets) -> dict[int, torch.Tensor]:
    """Token id → its ``unit_logit_weights`` (``Float[Tensor, "L F"]``), for every target's
    token at once (one ``(N, D) @ (D, F)`` matmul per layer, ``N`` tokens)."""
    tokens = sorted({t.token_id for t in targets})
    return dict(zip(tokens, scoring.unit_logit_weights(vlm, tokens))) if tokens else {}


def unit_scores(vlm, image: Image.Image, caption, targets, methods: Sequence[str],
                weights: dict | None = None, steps: Sequence[torch.Tensor] | None = None
                ) -> dict[str, list[torch.Tensor]]:
    """Every unit's score for each of one image's ``targets`` (``NounToken``s of ``caption``),
    under each scoring method of ``methods`` (``random`` is skipped: it does not score).

    ``weights``: :func:`logit_weights` of the targets if already computed. ``steps``: the
    activations ``Float[Tensor, "L F"]`` at each target's step (default: the caption's
    recorded ones). Returns method → one ``Float[Tensor, "L F"]`` per target.
    """
    out: dict[str, list[torch.Tensor]] = {}
    if "contribution" in methods:
        weights = weights if weights is not None else logit_weights(vlm, targets)
        steps = steps if steps is not None else [caption.activations.steps[t.step] for t in targets]
        out["contribution"] = [scoring.contribution_scores(vlm, a, t.token_id, weights[t.token_id])
                               for a, t in zip(steps, targets)]
    gradients = [m for m in methods if m in GRADIENT_METHODS]
    if gradients and targets:   # both gradient baselines share one forward pass
        places = scoring.gradient_attributions(vlm, vlm.inputs([image]), caption.token_ids,
                                               [(t.step, t.token_id) for t in targets],
                                               [GRADIENT_METHODS[m] for m in gradients])
        out.update({m: places[GRADIENT_METHODS[m]] for m in gradients})
    return out


class Ranked(NamedTuple):
    """One target's ranking: ``units`` ``Int[ndarray, "K 2"]`` (best first), their
    ``scores`` ``Float[ndarray, "K"]`` and ``polarity`` ``Int[ndarray, "K"]`` (±1)."""

    units: np.ndarray
    scores: np.ndarray
    polarity: np.ndarray


def rank_units(vlm, image: Image.Image, caption, targets, methods: Sequence[str], k: int,
               seed=0, draw: int | None = None, weights: dict | None = None,
               steps: Sequence[torch.Tensor] | None = None) -> dict[str, list[Ranked]]:
    """The top-``k`` units of each of one image's ``targets`` under each of ``methods``:
    method → one :class:`Ranked` per target. Every ranking in the package comes from here
    (identification, ablation, invariance, editing's baselines) or from ``unit_scores``.

    ``random`` draws ``k`` units from the seed ``[*seed, n]`` for target ``n`` (``[*seed, n,
    draw]`` when ``draw`` is given; ``seed`` an int or a sequence of ints); its ``scores`` are
    the units' contribution scores, for reference. The scoring methods share one pass (both
    gradient baselines one forward). ``weights`` / ``steps`` as in :func:`unit_scores`;
    polarity is the sign of the activation at each target's step.
    """
    steps = steps if steps is not None else [caption.activations.steps[t.step] for t in targets]
    weights = weights if weights is not None else logit_weights(vlm, targets)
    scored = unit_scores(vlm, image, caption, targets, methods, weights, steps)
    prefix = list(np.atleast_1d(seed))
    out: dict[str, list[Ranked]] = {}
    for method in methods:
        ranked = []
        for n, (target, acts) in enumerate(zip(targets, steps)):
            if method == "random":
                units = scoring.random_units(vlm.n_layers, vlm.d_ff, k,
                                             prefix + [n] + ([] if draw is None else [draw]))
                scores = scoring.contribution_scores(vlm, acts, target.token_id,
                                                     weights[target.token_id])
                scores = scores[torch.as_tensor(units[:, 0]), torch.as_tensor(units[:, 1])].cpu().numpy()
            else:
                units, scores = scoring.top_units(scored[method][n], k)
            ranked.append(Ranked(units, scores, scoring.polarity(acts, units)))
        out[method] = ranked
    return out


def find_neurons_by_method(vlm, images: Sequence[Image.Image], methods: Sequence[str] = METHODS,
                           top_k: int = 50, seed: int = 0, max_new_tokens: int = 20,
                           batch_size: int = 16, image_activations: bool = False,
                           progress: bool = False,
                           image_keys: Sequence[str] | None = None) -> Identification:
    """``find_neurons`` for several methods on one generation: an :class:`Identification`
    (it unpacks as ``table, captions``).

    The table stacks each method's rows; the captions keep their activations (with the image
    positions when ``image_activations``), e.g. for heatmaps. ``image_keys``: one stable name
    per image (e.g. ``ImageSet.names``); default ``image-0``, ``image-1``, ….
    """
    images = list(images)
    keys = [f"image-{i}" for i in range(len(images))] if image_keys is None else list(image_keys)
    captions = vlm.describe(images, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            activation="down_proj_input", image_activations=image_activations,
                            progress=progress)
    tables = [find_neurons(vlm, images, method=m, top_k=top_k, seed=seed, captions=captions,
                           progress=progress) for m in methods]
    table = pd.concat(tables, ignore_index=True)
    settings = dict(model=vlm.name, methods=list(methods), top_k=top_k, seed=seed,
                    max_new_tokens=max_new_tokens, image_activations=image_activations)
    return Identification(table, captions, keys, settings)


def _targets(vlm, caption, nouns):
    """The (noun, step, token) to score: the caption's nouns, or the asked-for ones."""
    if nouns is None:
        return caption.noun_tokens
    found = {t.noun: t for t in locate_nouns(vlm.tokenizer, caption.token_ids, nouns)}
    missing = [n for n in nouns if n not in found]
    if missing:
        said = ", ".join(caption.nouns) or "(none found)"
        raise NounNotInCaption(f"noun(s) {', '.join(map(repr, missing))} not in the caption "
                               f"{caption.text!r}; its nouns are: {said}")
    return [found[n] for n in nouns]


def score_maps(vlm, images: Sequence[Image.Image], methods: Sequence[str] = ("contribution", "gradient"),
               max_new_tokens: int = 20) -> list[dict]:
    """Every unit's score under each method, for each (image, noun): for comparing methods.

    Returns one dict per (image, noun) with ``image``, ``noun``, ``token_id`` and, per
    method, a ``Float[Tensor, "L F"]`` of scores.
    """
    captions = vlm.describe(list(images), max_new_tokens=max_new_tokens, activation="down_proj_input")
    out = []
    for index, (img, caption) in enumerate(zip(images, captions)):
        targets = caption.noun_tokens
        scores = unit_scores(vlm, img, caption, targets, methods)
        for n, target in enumerate(targets):
            out.append(dict(image=index, noun=target.noun, token_id=target.token_id,
                            **{method: per_target[n] for method, per_target in scores.items()}))
    return out
