"""``find_neurons``: the multi-modal neurons of every noun a model says about an image.

Data flow: image → ``VLM.describe(activation=...)`` (one generation, activations
recorded with the KV cache on) → nouns and the step of each → per-noun unit
scores (:mod:`mmneurons_utils.method.scoring`) → the top ``k`` units → a tidy table.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from . import scoring
from ..model.cache import model_hash
from ..store.identifications import ResultFileError, read_sidecar
from ..store.provenance import image_hash
from .identification import Identification
from ..model.nouns import locate_nouns, noun_token_id

METHODS = ("contribution", "gradient", "gradient_image", "random")   # the paper's, and the default set
# beyond the paper: a logit-difference score against the other candidate nouns, and the null that
# selects like contribution does (its layers and activation magnitudes, activations shuffled)
EXTRA_METHODS = ("noun_contrast", "selection_null")
ALL_METHODS = METHODS + EXTRA_METHODS
NULL_DRAWS = 5
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
                 captions: Sequence | None = None, candidates: Sequence[str] | None = None,
                 null_draws: int = NULL_DRAWS) -> pd.DataFrame:
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

    Beyond the paper: ``noun_contrast`` scores ``a · (W_U[t] − mean_{c ≠ t} W_U[c]) · W_out``,
    the unit's contribution to the noun's logit minus its mean contribution to the other
    ``candidates``' logits (default: the model's noun vocabulary, else its candidate nouns), so
    that units writing every noun alike score 0. ``selection_null`` is the null that selects
    like contribution does: per (image, noun) and draw, each layer's activations are shuffled
    over its units and the same number of units per layer as contribution's top ``top_k`` is
    kept by the shuffled score (:func:`~mmneurons_utils.method.scoring.selection_null_units`);
    ``null_draws`` draws, told apart by a ``draw`` column (only this method's rows have one).

    Returns a long-form DataFrame, one row per (image, noun, neuron), columns
    ``image, noun, token_id, step, method, rank, layer, unit, score, polarity, top_tokens,
    noun_rank``: ``rank`` 0 is the top unit; ``polarity`` (±1) is the sign of the unit's
    coefficient ``a`` at the noun's step, the direction in which it writes; ``top_tokens``
    are the top of the unit's logit lens in that direction, ``p · (W_U · W_out[l][:, i])``,
    and ``noun_rank`` is the noun token's rank in that lens (0 = the unit's top token).
    """
    from tqdm.auto import tqdm

    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {', '.join(ALL_METHODS)}, got {method!r}")
    check_top_k(vlm, top_k)
    if isinstance(null_draws, bool) or not isinstance(null_draws, int) or null_draws < 1:
        raise ValueError(f"null_draws must be a positive integer, got {null_draws!r}")
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
    flat = [t for ts in targets for t in ts]
    weights = logit_weights(vlm, flat)
    contrast = contrast_weights(vlm, flat, candidates) if method == "noun_contrast" else None
    draws = range(null_draws) if method == "selection_null" else [None]
    picks = []  # (image index, target, units (K, 2), scores (K,), polarity (K,), draw)
    for index, img, caption, image_targets in tqdm(list(zip(indices, images, captions, targets)),
                                                   desc=f"find ({method})", disable=not progress):
        for draw in draws:
            ranked = rank_units(vlm, img, caption, image_targets, (method,), top_k, [seed, index],
                                draw=draw, weights=weights, contrast=contrast)[method]
            picks += [(index, target, *r, draw) for target, r in zip(image_targets, ranked)]
    rows = _rows(vlm, method, picks, n_top_tokens)
    table = pd.DataFrame(rows, columns=COLUMNS + ["draw"])
    if method != "selection_null":
        table = table.drop(columns="draw")
    table.attrs["captions"] = [c.text for c in captions]
    return table


def _rows(vlm, method: str, picks: list, n_top_tokens: int) -> list[tuple]:
    """The table's rows of ``picks`` (``(image, target, units (K, 2), scores (K,), polarity
    (K,))`` each), with every unit's top tokens and noun rank from one pass of the lens."""
    empty = np.zeros((0, 2), dtype=np.int64)
    all_units = np.concatenate([p[2] for p in picks]) if picks else empty
    signs = np.concatenate([p[4] for p in picks]) if picks else np.zeros(0, dtype=np.int64)
    signs = signs.astype(np.int64)
    nouns_of_rows = np.concatenate([np.full(len(p[2]), p[1].token_id) for p in picks]) if picks \
        else np.zeros(0, dtype=np.int64)
    top_ids, noun_ranks = scoring.unit_logit_lens(vlm, all_units, n_top_tokens, signs,
                                                  nouns_of_rows)    # one pass for all rows
    rows, r = [], 0
    for index, target, units, scores, polarity, draw in picks:
        for rank, ((layer, unit), score, sign) in enumerate(zip(units, scores, polarity)):
            rows.append((index, target.noun, target.token_id, target.step, method, rank,
                         int(layer), int(unit), float(score), int(sign),
                         vlm.token_strings(top_ids[r]), int(noun_ranks[r]), draw))
            r += 1
    return rows


def logit_weights(vlm, targets) -> dict[int, torch.Tensor]:
    """Token id → its ``unit_logit_weights`` (``Float[Tensor, "L F"]``), for every target's
    token at once (one ``(N, D) @ (D, F)`` matmul per layer, ``N`` tokens)."""
    tokens = sorted({t.token_id for t in targets})
    return dict(zip(tokens, scoring.unit_logit_weights(vlm, tokens))) if tokens else {}


def candidate_token_ids(vlm, candidates: Sequence[str] | None = None) -> list[int]:
    """The token ids of the candidate nouns ``noun_contrast`` contrasts with: ``candidates``,
    else the model's noun vocabulary, else its candidate nouns (first sub-token after a word,
    as a caption writes it)."""
    nouns = candidates if candidates is not None else (vlm.noun_vocabulary or vlm.candidate_nouns)
    if not nouns:
        raise ValueError("noun_contrast needs candidate nouns: this model has no noun vocabulary; "
                         "pass candidates=[...] (e.g. the nouns of your images' annotations)")
    ids = sorted({noun_token_id(vlm.tokenizer, n) for n in nouns})
    if len(ids) < 2:
        raise ValueError(f"noun_contrast needs at least two candidate nouns, got {list(nouns)!r}")
    return ids


def contrast_weights(vlm, targets, candidates: Sequence[str] | None = None) -> dict[int, torch.Tensor]:
    """Token id → ``(W_U[t] − mean_{c ≠ t} W_U[c]) · W_out`` (``Float[Tensor, "L F"]``) for
    every target's token, ``c`` over :func:`candidate_token_ids`."""
    tokens = sorted({t.token_id for t in targets})
    if not tokens:
        return {}
    directions = scoring.contrast_directions(vlm, tokens, candidate_token_ids(vlm, candidates))
    return dict(zip(tokens, scoring.direction_logit_weights(vlm, directions)))


def unit_scores(vlm, image: Image.Image, caption, targets, methods: Sequence[str],
                weights: dict | None = None, steps: Sequence[torch.Tensor] | None = None,
                contrast: dict | None = None) -> dict[str, list[torch.Tensor]]:
    """Every unit's score for each of one image's ``targets`` (``NounToken``s of ``caption``),
    under each scoring method of ``methods`` (``random`` is skipped: it does not score).

    ``weights``: :func:`logit_weights` of the targets if already computed; ``contrast``:
    :func:`contrast_weights` likewise. ``steps``: the activations ``Float[Tensor, "L F"]`` at
    each target's step (default: the caption's recorded ones). Returns method → one
    ``Float[Tensor, "L F"]`` per target. ``selection_null`` scores with contribution's scores
    (its own shuffled scores are drawn in :func:`rank_units`).
    """
    out: dict[str, list[torch.Tensor]] = {}
    if steps is None and {"contribution", "selection_null", "noun_contrast"} & set(methods):
        steps = [caption.activations.steps[t.step] for t in targets]
    if "contribution" in methods or "selection_null" in methods:
        weights = weights if weights is not None else logit_weights(vlm, targets)
        out["contribution"] = [scoring.contribution_scores(vlm, a, t.token_id, weights[t.token_id])
                               for a, t in zip(steps, targets)]
    if "noun_contrast" in methods:
        contrast = contrast if contrast is not None else contrast_weights(vlm, targets)
        out["noun_contrast"] = [a.float() * contrast[t.token_id] for a, t in zip(steps, targets)]
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
               steps: Sequence[torch.Tensor] | None = None,
               contrast: dict | None = None) -> dict[str, list[Ranked]]:
    """The top-``k`` units of each of one image's ``targets`` under each of ``methods``:
    method → one :class:`Ranked` per target. Every ranking in the package comes from here
    (identification, ablation, invariance, editing's baselines) or from ``unit_scores``.

    ``random`` draws ``k`` units from the seed ``[*seed, n]`` for target ``n`` (``[*seed, n,
    draw]`` when ``draw`` is given; ``seed`` an int or a sequence of ints); its ``scores`` are
    the units' contribution scores, for reference. ``selection_null`` shuffles each layer's
    activations (seed ``[*seed, n, draw or 0, 1]``) and keeps as many units per layer as
    contribution's top ``k``; its polarity is the sign of the shuffled activation it was
    scored with. The scoring methods share one pass (both gradient baselines one forward).
    ``weights`` / ``steps`` / ``contrast`` as in :func:`unit_scores`; polarity is the sign of
    the activation at each target's step.
    """
    steps = steps if steps is not None else [caption.activations.steps[t.step] for t in targets]
    weights = weights if weights is not None else logit_weights(vlm, targets)
    scored = unit_scores(vlm, image, caption, targets, methods, weights, steps, contrast)
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
            elif method == "selection_null":
                picked, _ = scoring.top_units(scored["contribution"][n], k)
                counts = np.bincount(picked[:, 0], minlength=vlm.n_layers)
                ranked.append(Ranked(*scoring.selection_null_units(
                    acts, weights[target.token_id], counts, prefix + [n, 0 if draw is None else draw, 1])))
                continue
            else:
                units, scores = scoring.top_units(scored[method][n], k)
            ranked.append(Ranked(units, scores, scoring.polarity(acts, units)))
        out[method] = ranked
    return out


def find_neurons_by_method(vlm, images: Sequence[Image.Image], methods: Sequence[str] = METHODS,
                           top_k: int = 50, seed: int = 0, max_new_tokens: int = 20,
                           batch_size: int = 16, image_activations: bool = False,
                           progress: bool = False,
                           image_keys: Sequence[str] | None = None,
                           candidates: Sequence[str] | None = None,
                           null_draws: int = NULL_DRAWS) -> Identification:
    """``find_neurons`` for several methods on one generation: an :class:`Identification`
    (it unpacks as ``table, captions``).

    The table stacks each method's rows; the captions keep their activations (with the image
    positions when ``image_activations``), e.g. for heatmaps. ``image_keys``: one stable name
    per image (e.g. ``ImageSet.names``); default ``image-0``, ``image-1``, ….
    ``candidates`` / ``null_draws``: for ``noun_contrast`` / ``selection_null`` (see
    :func:`find_neurons`).
    """
    images = list(images)
    return _identified(vlm, images, _image_keys(images, image_keys), _identity(vlm, images),
                       methods=methods, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, image_activations=image_activations, progress=progress,
                       candidates=candidates, null_draws=null_draws)


def _image_keys(images: list, image_keys: Sequence[str] | None) -> list[str]:
    return [f"image-{i}" for i in range(len(images))] if image_keys is None else list(image_keys)


def _identity(vlm, images: list) -> dict:
    """What an identification is computed from: every weight's hash, each image's content hash."""
    return dict(weights=model_hash(vlm), images=[image_hash(image) for image in images])


def _identified(vlm, images: list, keys: list[str], identity: dict, methods: Sequence[str],
                top_k: int, seed: int, max_new_tokens: int, batch_size: int,
                image_activations: bool, progress: bool, candidates: Sequence[str] | None,
                null_draws: int) -> Identification:
    """The work of :func:`find_neurons_by_method`, its ``identity`` computed by the caller."""
    captions = vlm.describe(images, max_new_tokens=max_new_tokens, batch_size=batch_size,
                            activation="down_proj_input", image_activations=image_activations,
                            progress=progress)
    tables = [find_neurons(vlm, images, method=m, top_k=top_k, seed=seed, captions=captions,
                           progress=progress, candidates=candidates, null_draws=null_draws)
              for m in methods]
    table = pd.concat(tables, ignore_index=True)
    settings = dict(model=vlm.name, methods=list(methods), top_k=top_k, seed=seed,
                    max_new_tokens=max_new_tokens, image_activations=image_activations)
    if "noun_contrast" in methods:
        settings["candidates"] = None if candidates is None else list(candidates)
    if "selection_null" in methods:
        settings["null_draws"] = null_draws
    return Identification(table, captions, keys, settings, identity)


def identify(vlm, images: Sequence[Image.Image], store: str | Path | None = None,
             methods: Sequence[str] = METHODS, top_k: int = 50, seed: int = 0,
             max_new_tokens: int = 20, batch_size: int = 16, image_activations: bool = False,
             progress: bool = False, image_keys: Sequence[str] | None = None,
             candidates: Sequence[str] | None = None, null_draws: int = NULL_DRAWS) -> Identification:
    """:func:`find_neurons_by_method`, computed once: with ``store`` (a folder), an
    identification saved there from the same weights (every byte), the same images (content
    hashes, in order), image keys and settings is loaded instead of computed, and a computed
    one is saved for the next caller. Anything changed — a weight, a pixel, ``top_k``, a
    method, the seed — gives another key, so it is computed afresh, never reused.

    The loaded identification equals the computed one exactly (table, captions, activations).
    """
    images = list(images)
    keys = _image_keys(images, image_keys)
    arguments = dict(methods=list(methods), top_k=top_k, seed=seed, max_new_tokens=max_new_tokens,
                     batch_size=batch_size, image_activations=image_activations,
                     candidates=None if candidates is None else list(candidates), null_draws=null_draws)
    if store is None:
        return find_neurons_by_method(vlm, images, progress=progress, image_keys=keys, **arguments)
    identity = _identity(vlm, images)
    wanted = dict(arguments=arguments, identity=identity, image_keys=keys)
    digest = hashlib.blake2b(json.dumps(wanted, sort_keys=True).encode(), digest_size=8).hexdigest()
    folder = Path(store) / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', vlm.name)[-40:]}-{digest}"
    sidecar = read_sidecar(folder)
    if sidecar is not None and sidecar.get("key") == wanted:
        try:
            return Identification.load(folder)
        except ResultFileError:
            pass                                     # damaged: computed again below
    ident = _identified(vlm, images, keys, identity, progress=progress, **arguments)   # hashed once
    ident.save(folder, key=wanted)
    return ident


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
               max_new_tokens: int = 20, captions: Sequence | None = None) -> list[dict]:
    """Every unit's score under each method, for each (image, noun): for comparing methods.

    Returns one dict per (image, noun) with ``image``, ``noun``, ``token_id`` and, per
    method, a ``Float[Tensor, "L F"]`` of scores. ``captions``: the images' captions with
    their activations (an :class:`Identification`'s), so that they are not generated again.
    """
    if captions is None:
        captions = vlm.describe(list(images), max_new_tokens=max_new_tokens, activation="down_proj_input")
    elif len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    out = []
    for index, (img, caption) in enumerate(zip(images, captions)):
        targets = caption.noun_tokens
        scores = unit_scores(vlm, img, caption, targets, methods)
        for n, target in enumerate(targets):
            out.append(dict(image=index, noun=target.noun, token_id=target.token_id,
                            **{method: per_target[n] for method, per_target in scores.items()}))
    return out
