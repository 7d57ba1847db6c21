"""Causal effect of the identified units: perturb them and watch the noun.

For every (image, noun) of the model's own captions, the units ranked by the
contribution score (the paper), by gradient × activation, or drawn at random
(several seeded draws) are perturbed (:func:`~mmneurons_utils.interventions.ablation.perturb_units`)
in nested sets of size ``k`` (the top-``k`` of one ranking, so curves over ``k`` are
comparable), and two things are measured:

* **logit margin and probability** of the noun at its step: the noun token's logit minus
  the largest other logit, read by **teacher-forcing the original caption prefix** (one
  forward pass over prompt + original caption). This is well-defined even when the
  perturbation changes earlier tokens (a free-running caption may never reach a
  comparable step), it isolates the effect on *this* prediction, and it costs one
  forward pass per condition. A margin below 0 means the noun is no longer the greedy
  choice given the original prefix.
* **the greedy caption** generated under the perturbation: ``removed`` when it no longer
  contains the noun (as a whole word), ``changed`` when it differs from the clean caption
  at all.

Results are tidy long-form DataFrames (one row per image × noun × method × draw × k ×
perturbation); :func:`summarize` and :func:`half_removal_k` turn them into curves and
the k at which half of the nouns disappear.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..method.identification import Identification, top_k_groups
from ..method.identify import ALL_METHODS, logit_weights, rank_units
from .ablation import ablate_activations, perturb_units
from ..model.nouns import says
from ..model.teacher_forcing import teacher_forced_logits

LEVELS = ("weights", "activation")


def margin_and_prob(logits: torch.Tensor, token_id: int) -> tuple[float, float]:
    """``(logit[t] − max other logit, softmax[t])`` of one ``Float[Tensor, "V"]`` row."""
    others = logits.clone()
    others[token_id] = -torch.inf
    return float(logits[token_id] - others.max()), float(torch.softmax(logits, -1)[token_id])


def perturbation_name(sigma: float | None) -> str:
    return "zero" if sigma is None else f"noise σ={sigma:g}"


def rankings(vlm, images, captions, methods: Sequence[str], k: int, n_random: int,
             seed: int) -> list[dict]:
    """Per (image, noun): its unit rankings, ``method → [Int[ndarray, "K 2"], …]``, ``K`` =
    ``k`` (one array per random draw, seeds ``[seed, image, noun, draw]``; one for the
    other methods)."""
    out = []
    weights = logit_weights(vlm, [t for c in captions for t in c.noun_tokens])
    scored = [m for m in methods if m != "random"]
    for index, (image, caption) in enumerate(zip(images, captions)):
        targets = caption.noun_tokens
        ranked = rank_units(vlm, image, caption, targets, scored, k, weights=weights)
        draws = [rank_units(vlm, image, caption, targets, ("random",), k, [seed, index],
                            draw=d, weights=weights)["random"] for d in range(n_random)] \
            if "random" in methods else []
        for n, target in enumerate(targets):
            ranks = {method: [ranked[method][n].units] for method in scored}
            if draws:
                ranks["random"] = [d[n].units for d in draws]
            out.append(dict(image=index, target=target, ranks=ranks))
    return out


def table_rankings(vlm, table, captions, methods: Sequence[str], k: int) -> list[dict]:
    """:func:`rankings` read from a ``find_neurons`` table of the same images (its ``image``
    column indexes them): the units a user found are the ones perturbed. Each (image, noun,
    method) must hold at least ``k`` ranks; a method's single table ranking is its one draw."""
    groups: dict[tuple, list] = {}          # key → one unit array per draw (selection_null has several)
    for key, rows in top_k_groups(table[table["method"].isin(methods)], k):
        groups.setdefault(key, []).append(rows[["layer", "unit"]].to_numpy())
    out = []
    for index, caption in enumerate(captions):
        for target in caption.noun_tokens:
            ranks = {m: groups[(index, target.noun, m)]
                     for m in methods if (index, target.noun, m) in groups}
            if ranks:
                out.append(dict(image=index, target=target, ranks=ranks))
    missing = [m for m in methods if not any(m in t["ranks"] for t in out)]
    if missing:
        raise ValueError(f"the table has no rows of method(s) {', '.join(missing)} for these "
                         f"images' nouns; its methods: {', '.join(sorted(table['method'].unique()))}")
    return out


def causal_curves(vlm, images, ks: Sequence[int] = (1, 10, 50, 100, 300),
                  methods: Sequence[str] | None = None,
                  sigmas: Sequence[float | None] = (None,), n_random: int = 3, seed: int = 0,
                  relative: bool = True, level: str = "weights", max_new_tokens: int = 20,
                  progress: bool = False, table: pd.DataFrame | Identification | None = None
                  ) -> pd.DataFrame:
    """Noun margin / probability / removal under perturbation of the top-``k`` units.

    ``images``: PIL images; every noun of each clean caption is a target.
    ``ks``: set sizes (nested: the top-``k`` of one ranking). ``methods``: any of
    ``contribution``, ``noun_contrast``, ``gradient``, ``gradient_image``, ``random``
    (``n_random`` seeded draws per noun) and ``selection_null`` (from a table: each of its
    draws; without one: one draw).
    ``table``: a ``find_neurons`` table of these ``images`` (``image`` = position in the
    list, ``top_k`` ≥ the largest ``k``), or the :class:`Identification` of
    ``find_neurons_by_method`` on them (its captions are used: nothing is captioned again):
    its units are the ones perturbed, per (image, noun, method), instead of ranking them here;
    ``methods`` then defaults to the table's (a ``random`` row set is one draw). Without a table, ``methods`` defaults to
    ``("contribution", "random")`` and the ranking is the same as ``find_neurons``'s.
    ``sigmas``: ``None`` = zero the columns, a float = Gaussian noise of that σ
    (relative to each column's RMS when ``relative``). ``level="activation"`` instead
    zeroes the units' coefficients only at the position that produces the noun (its
    direct effect; ``sigmas`` must be ``(None,)``).

    Returns one row per image × noun × method × draw × k × perturbation with columns
    ``image, noun, token_id, step, method, draw, k, perturbation, sigma, level,
    margin_clean, prob_clean, margin, prob, margin_drop, prob_drop, removed, changed,
    caption_clean, caption``.
    """
    images = list(images)
    table, captions = _identified(table, len(images), max_new_tokens)
    methods, ks = _checked(vlm, table, methods, ks, sigmas, level, n_random)
    if captions is None:
        captions = vlm.describe(images, max_new_tokens=max_new_tokens, activation="down_proj_input")
    clean_logits = teacher_forced_logits(vlm, images, [c.token_ids for c in captions])
    # each image's own prompt length: llava_next / idefics3 prompts differ in length by image
    prompt_lens = ([vlm.inputs([image])["input_ids"].shape[1] for image in images]
                   if level == "activation" else None)
    if table is not None:
        targets = table_rankings(vlm, table, captions, methods, ks[-1])
    else:
        targets = rankings(vlm, images, captions, methods, ks[-1], n_random, seed)
    jobs = [(t, m, d, k, s) for t in targets for m in methods if m in t["ranks"]
            for d in range(len(t["ranks"][m])) for k in ks for s in sigmas]
    rows = []
    for t, method, draw, k, sigma in tqdm(jobs, desc="causal", disable=not progress):
        index, target = t["image"], t["target"]
        units = t["ranks"][method][draw][:k]
        if level == "activation":
            context = ablate_activations(vlm, units,
                                         positions=[prompt_lens[index] - 1 + target.step])
        else:
            context = perturbation_context(vlm, units, sigma, seed=_noise_seed(seed, index, target, draw, k),
                                           relative=relative)
        m0, p0 = margin_and_prob(clean_logits[index][target.step], target.token_id)
        after = measure_condition(vlm, images[index], captions[index], target, context, max_new_tokens)
        rows.append(dict(image=index, noun=target.noun, token_id=target.token_id, step=target.step,
                         method=method, draw=draw, k=k, perturbation=perturbation_name(sigma),
                         sigma=np.nan if sigma is None else float(sigma), level=level,
                         **_compared(m0, p0, captions[index].text, after)))
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def _compared(margin_clean: float, prob_clean: float, caption_clean: str, after: dict) -> dict:
    """A curve row's measurements: clean vs perturbed (``after``: :func:`measure_condition`)."""
    return dict(margin_clean=margin_clean, prob_clean=prob_clean, margin=after["margin"],
                prob=after["prob"], margin_drop=margin_clean - after["margin"],
                prob_drop=prob_clean - after["prob"], removed=after["removed"],
                changed=after["changed"], caption_clean=caption_clean, caption=after["caption"])


def _noise_seed(seed: int, index: int, target, draw: int, k: int) -> int:
    """The noise of one condition: seeded by the run, the image, the noun's step, the draw and k."""
    return int(np.random.SeedSequence([seed, index, target.step, draw, k]).generate_state(1)[0])


CURVE_COLUMNS = ["image", "noun", "token_id", "step", "method", "draw", "k", "perturbation", "sigma",
                 "level", "margin_clean", "prob_clean", "margin", "prob", "margin_drop", "prob_drop",
                 "removed", "changed", "caption_clean", "caption"]


def measure_condition(vlm, image, caption, target, context, max_new_tokens: int = 20) -> dict:
    """One ablation condition: inside ``context`` (a perturbation, or ``nullcontext()`` for the
    clean model), teacher-force ``caption`` and caption ``image`` again.

    ``target``: the noun's ``NounToken`` in ``caption``. Returns ``margin, prob`` (the noun's
    logit margin and probability at its step, :func:`margin_and_prob`), ``caption`` (the new
    text), ``removed`` (it no longer says the noun) and ``changed`` (it differs at all).
    """
    with context:
        logits = teacher_forced_logits(vlm, [image], [caption.token_ids])[0]        # (S, V)
        text = vlm.describe([image], max_new_tokens=max_new_tokens)[0].text
    margin, prob = margin_and_prob(logits[target.step], target.token_id)
    return dict(margin=margin, prob=prob, caption=text, removed=not says(text, target.noun),
                changed=text != caption.text)


def _identified(table, n_images: int, max_new_tokens: int) -> tuple[pd.DataFrame | None, list | None]:
    """``(table, captions)`` of an :class:`Identification` of the ``n_images`` images (``None``
    captions for a plain table or none)."""
    if not isinstance(table, Identification):
        return table, None
    if len(table.captions) != n_images:
        raise ValueError(f"the identification holds {len(table.captions)} captions for {n_images} images")
    made = table.settings.get("max_new_tokens", max_new_tokens)
    if made != max_new_tokens:
        raise ValueError(f"the identification's captions were made with max_new_tokens={made}, "
                         f"not {max_new_tokens}; pass max_new_tokens={made}")
    return table.table, table.captions


def _checked(vlm, table, methods, ks, sigmas, level, n_random) -> tuple[tuple[str, ...], list[int]]:
    """The methods (default: the table's, else contribution and random) and the sorted set
    sizes of :func:`causal_curves`, or a ``ValueError`` naming the bad setting."""
    if methods is None:
        methods = (tuple(dict.fromkeys(table["method"])) if table is not None
                   else ("contribution", "random"))
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be among {', '.join(ALL_METHODS)}, got {list(methods)!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    if level == "activation" and any(s is not None for s in sigmas):
        raise ValueError("level='activation' zeroes coefficients; use sigmas=(None,)")
    total = vlm.n_layers * vlm.d_ff
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > total:
        raise ValueError(f"every k must be in 1 … {total} (the model's units), got {ks!r}")
    if n_random < 1:
        raise ValueError(f"n_random must be ≥ 1, got {n_random!r}")
    return tuple(methods), ks


def summarize(curves: pd.DataFrame) -> pd.DataFrame:
    """Means per ``perturbation, method, k``: margin, margin drop, probability drop, share of
    captions that lose the noun and that change at all, and ``n`` (rows averaged)."""
    grouped = curves.groupby(["perturbation", "method", "k"], sort=True)
    out = grouped.agg(margin=("margin", "mean"), margin_drop=("margin_drop", "mean"),
                      prob_drop=("prob_drop", "mean"), noun_removed=("removed", "mean"),
                      caption_changed=("changed", "mean"), n=("margin", "size"))
    return out.reset_index()


def half_removal_k(curves: pd.DataFrame, share: float = 0.5) -> pd.DataFrame:
    """Per ``perturbation, method``: the smallest measured ``k`` at which at least ``share``
    of the captions lose the noun, or ``NaN`` (with ``reached=False``) if no measured ``k``
    does — random units typically never reach it."""
    summary = summarize(curves)
    rows = []
    for (perturbation, method), group in summary.groupby(["perturbation", "method"], sort=True):
        hit = group[group.noun_removed >= share]
        rows.append(dict(perturbation=perturbation, method=method,
                         k_half=float(hit.k.min()) if len(hit) else np.nan, reached=bool(len(hit)),
                         max_k=int(group.k.max()), removed_at_max_k=float(group.noun_removed.iloc[-1])))
    return pd.DataFrame(rows)


def perturbation_context(vlm, units, sigma: float | None, seed: int = 0, relative: bool = True):
    """The weight perturbation used by the curves: zero (``sigma=None``) or noise; a no-op for no units."""
    if len(units) == 0:
        return nullcontext()
    if sigma is None:
        return perturb_units(vlm, units, mode="zero")
    return perturb_units(vlm, units, mode="noise", sigma=sigma, relative=relative, seed=seed)
