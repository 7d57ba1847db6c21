"""Noun hits against what the vocabulary allows: chance, ceilings, hub tokens and the null.

:func:`~mmneurons_utils.properties.sensitivity.noun_hits` asks whether a unit's top-10 tokens
name the noun. Whether that number means anything depends on three baselines this module
puts beside it, one row per (image, noun, method):

* **chance** ``10 / V``: what a unit with a random lens gives (0.13 at 75 tokens, 0.0002 at
  49,152); random units beat nothing where chance is ≈ 0;
* **ceiling** ``naming_units``: how many units of the whole model name the noun among their
  top-10 tokens in either direction (:func:`~mmneurons_utils.method.vocabulary.naming_units`).
  Where it is 0 no ranking can score a hit, so ``hit_where_nameable`` keeps only the nouns
  with at least one naming unit;
* **hubs**: tokens in the top-10 of more than 1 % of all units (and 5 × chance) crowd nouns out
  of every lens;
  ``noun_hit_no_hubs`` re-reads the units' lenses with the hub tokens left out.

The ``selection_null`` method's draws are averaged per (image, noun) so that each noun
instance counts once, as for the other methods.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..method import scoring, vocabulary
from ..method.identification import Identification, top_k_groups

HUB_SHARE = 0.01        # a hub token is in the top-10 of more than this share of all units
LENS_TOKENS = 10        # the "top-10 tokens" of a unit


def chance_top10(vlm) -> float:
    """``10 / V``: the chance that a unit with a random lens names a given token."""
    return LENS_TOKENS / vlm.lm_head.out_features


def noun_hit_table(vlm, ident: Identification, k: int = 10, lens: str = "raw",
                   hub_share: float = HUB_SHARE, over_chance: float = 5.0) -> pd.DataFrame:
    """One row per (image, noun, method) of ``ident`` (an :class:`Identification`): ``noun_hit`` (share of the top-``k`` units whose
    top-10 tokens name the noun) and ``noun_rank`` (median rank of the noun in their lenses),
    both read in the ``lens`` (``"raw"``: the paper's; ``"rms"``: see
    :func:`~mmneurons_utils.method.scoring.lens_unembedding`); ``noun_hit_no_hubs`` (the same
    with hub tokens left out); ``naming_units`` (the noun's ceiling), ``nameable`` and
    ``hit_where_nameable`` (``noun_hit`` where nameable, NaN elsewhere); ``chance`` (10 / V).
    ``attrs["hubs"]`` holds the hub tokens' strings, most frequent first (hubs: see
    :func:`~mmneurons_utils.method.vocabulary.hub_tokens`; ``hub_share`` and ``over_chance``
    are its thresholds).
    """
    return _noun_hit_table(vlm, ident.table, k, lens, hub_share, over_chance)


def _noun_hit_table(vlm, table: pd.DataFrame, k: int, lens: str, hub_share: float,
                    over_chance: float) -> pd.DataFrame:
    """:func:`noun_hit_table` of a plain ``find_neurons`` table."""
    hubs = vocabulary.hub_tokens(vlm, hub_share, LENS_TOKENS, lens, over_chance)
    groups = top_k_groups(table, k)
    if not groups:
        return pd.DataFrame(columns=["image", "noun", "method", "token_id", "noun_hit", "noun_rank",
                                     "noun_hit_no_hubs", "naming_units", "nameable",
                                     "hit_where_nameable", "chance"])
    units = np.concatenate([g[["layer", "unit"]].to_numpy(np.int64) for _, g in groups])
    signs = np.concatenate([g["polarity"].to_numpy(np.int64) for _, g in groups])
    tokens = np.concatenate([g["token_id"].to_numpy(np.int64) for _, g in groups])
    _, ranks = scoring.unit_logit_lens(vlm, units, LENS_TOKENS, signs, tokens, lens=lens)
    _, ranks_no_hubs = scoring.unit_logit_lens(vlm, units, LENS_TOKENS, signs, tokens, lens=lens,
                                               exclude=hubs)
    hub_set = set(hubs.tolist())
    ceilings = dict(zip(np.unique(tokens).tolist(),
                        vocabulary.naming_units(vlm, np.unique(tokens), LENS_TOKENS, lens).tolist()))
    rows, start = [], 0
    for (image, noun, method), group in groups:
        stop = start + len(group)
        token = int(group["token_id"].iloc[0])
        hit = float(np.mean(ranks[start:stop] < LENS_TOKENS))
        no_hubs = np.nan if token in hub_set else float(np.mean(ranks_no_hubs[start:stop] < LENS_TOKENS))
        rows.append(dict(image=image, noun=noun, method=method, token_id=token, noun_hit=hit,
                         noun_rank=float(np.median(ranks[start:stop])), noun_hit_no_hubs=no_hubs,
                         naming_units=ceilings[token]))
        start = stop
    frame = pd.DataFrame(rows)
    # the null's draws: one row per noun instance, as for every other method
    frame = frame.groupby(["image", "noun", "method"], sort=False, as_index=False).agg(
        token_id=("token_id", "first"), noun_hit=("noun_hit", "mean"), noun_rank=("noun_rank", "mean"),
        noun_hit_no_hubs=("noun_hit_no_hubs", "mean"), naming_units=("naming_units", "first"))
    frame["nameable"] = frame["naming_units"] > 0
    frame["hit_where_nameable"] = frame["noun_hit"].where(frame["nameable"])
    frame["chance"] = chance_top10(vlm)
    frame.attrs["hubs"] = vlm.token_strings(hubs.tolist())
    return frame


def ceiling_summary(frame: pd.DataFrame) -> dict:
    """Counts behind the ceiling, from :func:`noun_hit_table` rows of one method:
    ``instances``, ``nouns``, ``nouns_with_a_naming_unit`` (distinct nouns), and
    ``instances_nameable``."""
    nouns = frame.drop_duplicates("noun")
    return dict(instances=int(len(frame)), nouns=int(len(nouns)),
                nouns_with_a_naming_unit=int(nouns["nameable"].sum()),
                instances_nameable=int(frame["nameable"].sum()))


GENERIC_SHARE, GENERIC_MIN_NOUNS = 0.5, 3     # the rule of ``generic``: here and the atlas's column


def is_generic(nouns_per_unit, n_nouns: int):
    """Whether units kept by ``nouns_per_unit`` nouns (a number, an array or a Series) out of
    ``n_nouns`` write every noun rather than one: kept by at least half of them, and by 3 or more."""
    return (nouns_per_unit >= GENERIC_SHARE * n_nouns) & (nouns_per_unit >= GENERIC_MIN_NOUNS)


def generic_units(ident: Identification, k: int = 10, method: str = "contribution") -> set[tuple[int, int]]:
    """The ``(layer, unit)``s that ``method`` puts in the top-``k`` of at least half of the
    identification's nouns (and of at least 3): units that write every noun, not one (the atlas's rule)."""
    return _generic_units(ident.table, k, method)


def _generic_units(table: pd.DataFrame, k: int, method: str) -> set[tuple[int, int]]:
    """:func:`generic_units` of a plain ``find_neurons`` table."""
    rows = table[(table["method"] == method) & (table["rank"] < k)]
    nouns = rows["noun"].nunique()
    per_unit = rows.groupby(["layer", "unit"])["noun"].nunique()
    keep = per_unit[is_generic(per_unit, nouns)]
    return {(int(l), int(u)) for l, u in keep.index}


def generic_share(ident: Identification, k: int = 10, method: str = "contribution") -> float:
    """Share of ``method``'s top-``k`` rows (over every (image, noun) of ``ident``) whose unit is
    one of its :func:`generic_units`; NaN without rows."""
    return _generic_share(ident.table, k, method)


def _generic_share(table: pd.DataFrame, k: int, method: str) -> float:
    """:func:`generic_share` of a plain ``find_neurons`` table."""
    rows = table[(table["method"] == method) & (table["rank"] < k)]
    if rows.empty:
        return float("nan")
    generic = _generic_units(table, k, method)
    return float(np.mean([(int(l), int(u)) in generic for l, u in zip(rows["layer"], rows["unit"])]))


def method_comparison(vlm, ident: Identification, k: int = 10, lens: str = "raw") -> pd.DataFrame:
    """One row per method of ``ident`` (an :class:`Identification`): ``noun_hit``, ``hit_where_nameable``,
    ``noun_hit_no_hubs`` (means over noun instances), ``median_rank`` (median over instances of
    the units' median noun rank), ``generic_share`` (:func:`generic_share`), ``instances`` and
    ``chance`` (10 / V) — the baselines every sensitivity verdict is read against."""
    table = ident.table
    hits = noun_hit_table(vlm, ident, k, lens=lens)
    rows = []
    for method, part in hits.groupby("method", sort=False):
        rows.append(dict(method=method, noun_hit=part.noun_hit.mean(),
                         hit_where_nameable=part.hit_where_nameable.mean(),
                         noun_hit_no_hubs=part.noun_hit_no_hubs.mean(),
                         median_rank=part.noun_rank.median(),
                         generic_share=_generic_share(table, k, method), instances=len(part),
                         chance=chance_top10(vlm)))
    return pd.DataFrame(rows).set_index("method")


def per_layer(vlm, ident: Identification, k: int = 10) -> pd.DataFrame:
    """One row per (method, layer) holding any of ``ident``'s method's top-``k`` units: ``share`` of the
    method's units in the layer, their ``noun_hit`` and ``median_rank`` (noun in their lens,
    read in their polarity) and ``generic_share`` (of :func:`generic_units`)."""
    table = ident.table
    top = table[table["rank"] < k]
    rows = []
    for method, part in top.groupby("method", sort=False):
        generic = _generic_units(table, k, method)
        for layer, rows_of_layer in part.groupby("layer"):
            ranks = rows_of_layer["noun_rank"]
            rows.append(dict(method=method, layer=int(layer), share=len(rows_of_layer) / len(part),
                             noun_hit=float((ranks < LENS_TOKENS).mean()),
                             median_rank=float(ranks.median()),
                             generic_share=float(np.mean([(int(l), int(u)) in generic for l, u in
                                                          zip(rows_of_layer.layer, rows_of_layer.unit)]))))
    return pd.DataFrame(rows)
