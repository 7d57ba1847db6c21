"""Causal effect of the identified units: perturb them and watch the noun.

For every (image, noun) of an :class:`~mmneurons_utils.method.identification.Identification`'s
captions, the units it ranked (contribution, the paper; noun contrast; gradient ×
activation; the attribution at the image positions; the selection-matched null; random
draws) are perturbed in nested sets of size ``k`` (the top-``k`` of one ranking, so curves
over ``k`` are comparable) — their write vectors zeroed or moved by Gaussian noise
(:func:`~mmneurons_utils.interventions.ablation.perturb_units`'s numbers), or their coefficients
zeroed at the noun's step only — and two things are measured:

* **logit margin and probability** of the noun at its step: the noun token's logit minus
  the largest other logit, read by **teacher-forcing the original caption prefix** (a
  forward pass over prompt + original caption). This is well-defined even when the
  perturbation changes earlier tokens (a free-running caption may never reach a
  comparable step) and it isolates the effect on *this* prediction. A margin below 0 means
  the noun is no longer the greedy choice given the original prefix.
* **the greedy caption** generated under the perturbation: ``removed`` when it no longer
  contains the noun (as a whole word), ``changed`` when it differs from the clean caption
  at all.

The conditions of one image run together: each row of a batch carries its own units and
noise (:func:`~mmneurons_utils.interventions.ablation.perturb_rows`, per-row hooks; the weights are
never written), one teacher-forced forward gives every row's margin and one cached
``generate`` every row's caption (:func:`measure_conditions`).

Results are tidy long-form DataFrames (one row per image × noun × method × draw × k ×
perturbation); :func:`summarize` and :func:`half_removal_k` turn them into curves and
the k at which half of the nouns disappear.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..method.identification import Identification, top_k_groups
from ..method.identify import ALL_METHODS, logit_weights, rank_units
from .ablation import RowPerturbation, ablate_activations, perturb_rows, perturb_units
from ..model.nouns import says
from ..model.teacher_forcing import teacher_forced_inputs, teacher_forced_logits

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
    ``k``, scored from the captions' recorded activations (no generation; the gradient
    baselines take one teacher-forced forward and backward per image): one array per random
    draw (seeds ``[seed, image, noun, draw]``), one for the other methods."""
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


def table_rankings(table: pd.DataFrame, captions, methods: Sequence[str], k: int) -> list[dict]:
    """:func:`rankings` read from an identification's table (its ``image`` column indexes
    ``captions``): the units identified are the ones perturbed. Each (image, noun, method) must
    hold at least ``k`` ranks; a method's single table ranking is its one draw (the
    selection-matched null: each of its draws)."""
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
        raise ValueError(f"the identification has no rows of method(s) {', '.join(missing)} for "
                         f"these images' nouns; its methods: {', '.join(sorted(table['method'].unique()))}")
    return out


def causal_curves(vlm, ident: Identification, images, ks: Sequence[int] = (1, 10, 50),
                  methods: Sequence[str] | None = None,
                  sigmas: Sequence[float | None] = (None,), n_random: int = 3, seed: int = 0,
                  relative: bool = True, level: str = "weights", max_new_tokens: int | None = None,
                  rerank: bool = False, batch_size: int | None = 32,
                  progress: bool = False) -> pd.DataFrame:
    """Noun margin / probability / removal under perturbation of the top-``k`` units.

    ``ident``: the :class:`Identification` of ``images`` (PIL images, in its order: it holds
    no pixels); every noun of each of its captions is a target, and nothing is captioned or
    identified again. ``ks``: set sizes (nested: the top-``k`` of one ranking).

    * Every ``k`` ≤ the identification's ``top_k``: its units are the ones perturbed, per
      (image, noun, method), read from its table; ``methods`` defaults to its methods, and a
      method's table ranking is one draw (``random``: one draw; ``selection_null``: each of
      its draws; ``n_random`` is not used).
    * A ``k`` above it (or ``rerank=True``): every method is ranked again to the largest ``k`` from the
      identification's captions' recorded activations (no generation; the ranking
      ``find_neurons`` makes), ``random`` with ``n_random`` seeded draws; ``methods`` defaults
      to ``contribution`` and ``random``. ``selection_null`` is matched to the identification's
      ``top_k`` and is refused there (``ValueError``).

    ``methods``: any of ``contribution``, ``noun_contrast``, ``gradient``, ``gradient_image``,
    ``random``, ``selection_null``. ``sigmas``: ``None`` = zero the columns, a float = Gaussian
    noise of that σ (relative to each column's RMS when ``relative``), seeded per condition.
    ``level="activation"`` instead zeroes the units' coefficients only at the position that
    produces the noun (its direct effect; ``sigmas`` must be ``(None,)``).
    ``batch_size``: conditions of one image measured together (:func:`measure_conditions`,
    per-row hooks: the same numbers as perturbing the weights one condition at a time, up to
    float summation order); ``None`` runs that reference instead (:func:`measure_sequentially`).

    Returns one row per image × noun × method × draw × k × perturbation with columns
    ``image, noun, token_id, step, method, draw, k, perturbation, sigma, level,
    margin_clean, prob_clean, margin, prob, margin_drop, prob_drop, removed, changed,
    caption_clean, caption``.
    """
    if not isinstance(ident, Identification):
        raise TypeError(f"causal_curves takes the Identification of the images (identify(…) / "
                        f"find_neurons_by_method(…)), then the images; got {type(ident).__name__}")
    images = list(images)
    if len(images) != ident.n_images:
        raise ValueError(f"the identification holds {ident.n_images} images' captions, "
                         f"but {len(images)} images were given")
    made = int(ident.settings.get("max_new_tokens", 20))
    if max_new_tokens is not None and max_new_tokens != made:
        raise ValueError(f"the identification's captions were made with max_new_tokens={made}, "
                         f"not {max_new_tokens}; pass max_new_tokens={made} (or leave it out)")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size!r}")
    top_k = ident.top_k
    methods, ks, from_table = _checked(vlm, ident, top_k, methods, ks, sigmas, level, n_random, rerank)
    captions = ident.captions
    if from_table:
        targets = table_rankings(ident.table, captions, methods, ks[-1])
    else:
        targets = rankings(vlm, images, captions, methods, ks[-1], n_random, seed)
    clean_logits = teacher_forced_logits(vlm, images, [c.token_ids for c in captions])
    jobs = [(t, m, d, k, s) for t in targets for m in methods if m in t["ranks"]
            for d in range(len(t["ranks"][m])) for k in ks for s in sigmas]
    by_image: dict[int, list] = {}
    for job in jobs:
        by_image.setdefault(job[0]["image"], []).append(job)
    measured: dict[int, dict] = {}                    # id(job) → its measurement
    bar = tqdm(total=len(jobs), desc="causal", disable=not progress)
    for index, group in by_image.items():
        # each image's own prompt length: llava_next / idefics3 prompts differ in length by image
        prompt_len = vlm.inputs([images[index]])["input_ids"].shape[1] if level == "activation" else 0
        rows = [(t["target"], _row(t, method, draw, k, sigma, seed, relative, level, prompt_len))
                for t, method, draw, k, sigma in group]
        after = measure_conditions(vlm, images[index], captions[index], rows, batch_size,
                                   max_new_tokens=made, on_batch=bar.update)
        measured.update({id(job): a for job, a in zip(group, after)})
    bar.close()
    out = []
    for job in jobs:
        t, method, draw, k, sigma = job
        index, target = t["image"], t["target"]
        m0, p0 = margin_and_prob(clean_logits[index][target.step], target.token_id)
        out.append(dict(image=index, noun=target.noun, token_id=target.token_id, step=target.step,
                        method=method, draw=draw, k=k, perturbation=perturbation_name(sigma),
                        sigma=np.nan if sigma is None else float(sigma), level=level,
                        **_compared(m0, p0, captions[index].text, measured[id(job)])))
    return pd.DataFrame(out, columns=CURVE_COLUMNS)


def _row(t: dict, method: str, draw: int, k: int, sigma, seed: int, relative: bool, level: str,
         prompt_len: int) -> RowPerturbation:
    """One condition as a :class:`RowPerturbation` (the noise seeded as :func:`_noise_seed`)."""
    units = np.asarray(t["ranks"][method][draw][:k], dtype=np.int64).reshape(-1, 2)
    target = t["target"]
    if level == "activation":
        return RowPerturbation(units, "zero", positions=(prompt_len - 1 + target.step,))
    if sigma is None:
        return RowPerturbation(units, "zero")
    return RowPerturbation(units, "noise", sigma=float(sigma), relative=relative,
                           seed=_noise_seed(seed, t["image"], target, draw, k))


def _compared(margin_clean: float, prob_clean: float, caption_clean: str, after: dict) -> dict:
    """A curve row's measurements: clean vs perturbed (``after``: :func:`measure_conditions`)."""
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


def measure_conditions(vlm, image, caption, conditions: Sequence[tuple], batch_size: int | None = 32,
                       max_new_tokens: int | None = None, on_batch=None) -> list[dict]:
    """Several ablation conditions of one image, ``batch_size`` at a time in one batch: row ``r``
    runs under its own perturbation (:func:`~mmneurons_utils.interventions.ablation.perturb_rows`).

    ``conditions``: ``[(target, perturbation), …]``, ``target`` a ``NounToken`` of ``caption``,
    ``perturbation`` a :class:`RowPerturbation` (``None``: the clean model). Per batch: one
    teacher-forced forward over prompt + ``caption`` (its caption steps' logits only), and one
    greedy ``generate`` with the KV cache (``max_new_tokens``: default 20) of just the rows
    whose teacher-forced argmax leaves the clean caption somewhere (the others would say it
    again: greedy decoding is argmax after argmax). Returns, per condition, ``margin, prob`` (the noun's logit margin and
    probability at its step, :func:`margin_and_prob`), ``caption`` (the new text),
    ``removed`` (it no longer says the noun) and ``changed`` (it differs at all).
    ``batch_size=None``: :func:`measure_sequentially` (the reference, one condition at a time).
    """
    max_new_tokens = 20 if max_new_tokens is None else max_new_tokens
    if batch_size is None:
        out = []
        for target, row in conditions:
            out.append(measure_sequentially(vlm, image, caption, target, row, max_new_tokens))
            if on_batch is not None:
                on_batch(1)
        return out
    out = []
    shortcut = _plain_greedy(vlm)
    for start in range(0, len(conditions), int(batch_size)):
        chunk = conditions[start:start + int(batch_size)]
        rows = [row for _, row in chunk]
        with perturb_rows(vlm, rows):
            logits = _caption_logits(vlm, image, caption.token_ids, len(chunk))      # (B, S+1, V)
        # greedy decoding is argmax after argmax: a row whose teacher-forced argmax is the clean
        # caption at every step (and then a stop, unless the caption used the whole budget)
        # generates the clean caption again, so only the other rows are generated
        kept = _keeps_caption(vlm, logits, caption.token_ids, max_new_tokens) if shortcut \
            else [False] * len(chunk)
        texts = [caption.text if same else None for same in kept]
        redo = [r for r, same in enumerate(kept) if not same]
        if redo:
            with perturb_rows(vlm, [rows[r] for r in redo]):
                made = vlm.describe([image] * len(redo), max_new_tokens=max_new_tokens,
                                    batch_size=len(redo))
            for r, c in zip(redo, made):
                texts[r] = c.text
        for r, ((target, _), text) in enumerate(zip(chunk, texts)):
            margin, prob = margin_and_prob(logits[r, target.step], target.token_id)
            out.append(dict(margin=margin, prob=prob, caption=text, removed=not says(text, target.noun),
                            changed=text != caption.text))
        if on_batch is not None:
            on_batch(len(chunk))
    return out


# generation settings that make greedy decoding more than argmax after argmax
_NOT_PLAIN = dict(repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
                  encoder_no_repeat_ngram_size=0, bad_words_ids=None, min_length=0, min_new_tokens=None,
                  forced_bos_token_id=None, forced_eos_token_id=None, begin_suppress_tokens=None,
                  sequence_bias=None, exponential_decay_length_penalty=None, num_beams=1,
                  guidance_scale=None, watermarking_config=None)   # (describe passes do_sample=False)


def _plain_greedy(vlm) -> bool:
    """Whether ``vlm.describe`` decodes by plain argmax (its suppressed tokens aside)."""
    config = vlm.model.generation_config
    return all(getattr(config, key, default) in (default, None) if default is not None
               else getattr(config, key, None) is None for key, default in _NOT_PLAIN.items())


def _keeps_caption(vlm, logits: torch.Tensor, token_ids: Sequence[int], max_new_tokens: int) -> list[bool]:
    """Per row of teacher-forced ``logits`` (``Float[Tensor, "B S+1 V"]``, the step after the
    caption last): whether greedy decoding (``vlm.describe``'s: its suppressed tokens never
    chosen, any of its stop tokens ends the caption) says ``token_ids`` again."""
    config = vlm.model.generation_config
    eos = config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) | {vlm.tokenizer.pad_token_id}
    suppress = sorted(set(config.suppress_tokens or []) | set(vlm.placeholder_token_ids))
    scores = logits.clone()
    if suppress:
        scores[..., torch.as_tensor(suppress, device=scores.device)] = -torch.inf
    predicted = scores.argmax(-1).cpu()                                            # (B, S+1)
    steps = len(token_ids)
    same = (predicted[:, :steps] == torch.as_tensor(list(token_ids), dtype=predicted.dtype)).all(1)
    if steps < max_new_tokens:                  # the clean caption stopped: so must this one
        same &= torch.as_tensor([int(t) in stop for t in predicted[:, steps]])
    return same.tolist()


def measure_sequentially(vlm, image, caption, target, row: RowPerturbation | None,
                        max_new_tokens: int = 20) -> dict:
    """One condition the direct way — the reference :func:`measure_conditions` is tested and
    benchmarked against: the weights perturbed in place (:func:`~mmneurons_utils.interventions.
    ablation.perturb_units`; zeroing at chosen positions through :func:`~mmneurons_utils.
    interventions.ablation.ablate_activations`), the caption teacher-forced and generated again
    for this one condition (batch 1). Returns what :func:`measure_conditions` returns per row."""
    if row is None or len(row.units) == 0:
        context = nullcontext()
    elif row.positions is not None:
        context = ablate_activations(vlm, row.units, positions=list(row.positions))
    elif row.mode == "zero":
        context = perturb_units(vlm, row.units, mode="zero")
    else:
        context = perturb_units(vlm, row.units, mode="noise", sigma=row.sigma, relative=row.relative,
                                seed=row.seed)
    with context:
        logits = teacher_forced_logits(vlm, [image], [caption.token_ids])[0]        # (S, V)
        text = vlm.describe([image], max_new_tokens=max_new_tokens)[0].text
    margin, prob = margin_and_prob(logits[target.step], target.token_id)
    return dict(margin=margin, prob=prob, caption=text, removed=not says(text, target.noun),
                changed=text != caption.text)


@torch.no_grad()
def _caption_logits(vlm, image, token_ids: Sequence[int], batch: int) -> torch.Tensor:
    """``Float[Tensor, "B S+1 V"]`` (float32, the model's device): ``batch`` rows teacher-forcing
    ``token_ids`` (``S`` tokens) after ``image``'s prompt; row ``j`` of each is the distribution
    that produced caption token ``j`` (row ``S``: the step after the caption). Only these
    positions go through the unembedding where the model can skip the others."""
    full, prompt_len, _ = teacher_forced_inputs(vlm, [image] * batch, [list(token_ids)] * batch)
    positions = torch.arange(prompt_len - 1, prompt_len + len(token_ids), device=full["input_ids"].device)
    if _keeps_logits(vlm.model):
        return vlm.model(**full, logits_to_keep=positions).logits.float()
    return vlm.model(**full).logits[:, positions].float()


def _keeps_logits(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _checked(vlm, ident, top_k, methods, ks, sigmas, level, n_random,
             rerank) -> tuple[tuple[str, ...], list[int], bool]:
    """The methods, the sorted set sizes of :func:`causal_curves` and whether the units come
    from the identification's table, or a ``ValueError`` naming the bad setting."""
    total = vlm.n_layers * vlm.d_ff
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > total:
        raise ValueError(f"every k must be in 1 … {total} (the model's units), got {ks!r}")
    from_table = ks[-1] <= top_k and not rerank
    if methods is None:
        methods = (tuple(dict.fromkeys(ident.table["method"])) if from_table
                   else ("contribution", "random"))
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad or not methods:
        raise ValueError(f"methods must be among {', '.join(ALL_METHODS)}, got {list(methods)!r}")
    if not from_table and "selection_null" in methods:
        raise ValueError(f"selection_null is matched to the identification's top_k={top_k}: it is "
                         f"read from its table only, every k ≤ {top_k} and no rerank (got k up to "
                         f"{ks[-1]}); identify with a larger top_k")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    if level == "activation" and any(s is not None for s in sigmas):
        raise ValueError("level='activation' zeroes coefficients; use sigmas=(None,)")
    if n_random < 1:
        raise ValueError(f"n_random must be ≥ 1, got {n_random!r}")
    return tuple(methods), ks, from_table


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
