"""The neuron atlas: for every noun the models says over a dataset, its recurring units,
each with its dataset examples.

One captioning pass (``describe(activation="down_proj_input", image_activations=True)``, batch
by batch) serves everything: each batch is identified (``find_neurons`` with the methods
``contribution`` and ``random``, on the batch's captions), merged into the streaming
dataset examples (:mod:`mmneurons_utils.atlas.examples`) and reduced to per-noun activation sums;
then its activations are dropped. Memory: one batch of activations, the ``L × F × E``
example state, the identification table and ``2 × L × F`` sums per distinct noun.

Images that an :class:`~mmneurons_utils.method.identification.Identification` already covers
(``ident``: the first ``ident.n_images`` of the images, made with image activations) are
neither captioned nor identified again: their captions and their ``contribution`` and
``random`` rows (``rank < top_k``) are read from it; only the images after them are streamed.

One row per (noun, unit):

* ``n_images``: the images whose caption says the noun (the captions' nouns, so an image
  folder without ground truth works); ``base_rate``: their share of all images;
* ``frequency``: share of the noun's images in whose top-``top_k`` contribution units the
  unit appears (cross-image recurrence); kept: the ``units_per_noun`` most frequent units
  of each noun and every unit with ``frequency ≥ min_frequency``;
* ``polarity``: the majority sign of the unit's coefficient over the noun's rows (ties +1);
  ``mean_score``: its mean contribution score there; ``top_tokens`` / ``noun_rank``: its
  logit lens in that polarity (as in ``find_neurons``);
* ``purity``: share of the unit's top-``E`` dataset images (in its polarity, ranked by
  ``max p · a`` over the image tokens) whose caption says the noun; ``purity_random``: the
  mean of the same purity over the ``random`` units drawn for the noun's images (each with
  its polarity at the noun step), the baseline; chance is about ``base_rate``;
* ``modality``: how much the unit fires on the image rather than on the text. For each of
  the noun's images, ``a_image`` = mean ``|a|`` over its image tokens (prefill) and
  ``a_caption`` = mean ``|a|`` over its caption steps (the positions whose logits produce
  the caption's tokens); ``modality = mean(a_image) / (mean(a_image) + mean(a_caption))``
  over the noun's images: 1 = fires only on image tokens, 0 = only at the caption steps,
  0.5 = equally;
* ``example_images``: the unit's top-``E`` image indices (in its polarity), best first,
  and ``example_scores`` their ``max p · a``;
* ``noun_share``: the share of the atlas's nouns that keep this unit; ``generic``: the unit is
  kept for at least half of the nouns (and for three or more). Such units write *every* noun
  (frequency ≈ 1 for each, the same top tokens, purity ≈ base rate): they belong to the
  caption format, not to one object, so :func:`summary` reports purity over the
  noun-specific units beside purity over all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .examples import ExampleStream, UnitExamples, covered_images, purity
from ..method.identification import Identification
from ..method.identify import COLUMNS, check_top_k, find_neurons
from ..properties.nameability import is_generic
from ..store.results import write_parquet

ATLAS_COLUMNS = ["noun", "layer", "unit", "polarity", "frequency", "n_images", "base_rate",
                 "mean_score", "top_tokens", "noun_rank", "purity", "purity_random", "modality",
                 "example_images", "example_scores", "noun_share", "generic"]
_META_KEY = b"mmneurons_atlas"


def build_atlas(vlm, images: Sequence, top_k: int = 10, examples: int = 8, seed: int = 0,
                units_per_noun: int = 3, min_frequency: float = 0.5, batch_size: int = 16,
                max_new_tokens: int = 20, progress: bool = False,
                return_parts: bool = False, ident: Identification | None = None):
    """The atlas table (see the module doc) of ``images``; one captioning pass.

    ``top_k``: units identified per (image, noun); ``examples``: ``E``, top images kept per
    unit and end; ``seed``: the random baseline's draws. With ``return_parts`` also returns
    ``(table, parts)`` where ``parts`` holds the ``UnitExamples``, the identification
    table (both methods) and each image's caption text and nouns.

    ``ident``: the :class:`Identification` of the first ``ident.n_images`` of ``images`` (the
    same pictures, checked by content hash; identified with ``image_activations=True``, the
    methods ``contribution`` and ``random`` and ``top_k`` at least this one). Those images are
    read from it (captions, activations, rows of ``rank < top_k``) instead of being captioned
    and identified again; its random units are the first ``top_k`` of its draws, and ``seed``
    applies to the images after it. Without ``ident`` the result is the streaming pass's.
    """
    from tqdm.auto import tqdm

    check_top_k(vlm, top_k)
    if not 0 <= min_frequency <= 1:
        raise ValueError(f"min_frequency must be in 0 … 1, got {min_frequency!r}")
    images = list(images)
    covered = 0 if ident is None else _check_covers(ident, images, top_k)
    stream = ExampleStream(vlm.n_layers, vlm.d_ff, examples)
    tables, texts, nouns_of = [], [], []
    sums: dict[str, list] = {}            # noun → [Σ image mean|a| (L, F), Σ caption mean|a|, count]
    bar = tqdm(total=len(images), desc="atlas", disable=not progress)
    starts = ([0] if covered else []) + list(range(covered, len(images), batch_size))
    for start in starts:
        if start == 0 and covered:      # the identified images: read, not computed again
            batch, captions = images[:covered], list(ident.captions)
            indices = list(range(covered))
            rows = ident.table[ident.table["method"].isin(("contribution", "random"))
                               & (ident.table["rank"] < top_k)]
            tables.append(rows[[c for c in COLUMNS if c in rows]].reset_index(drop=True))
        else:
            batch = images[start:start + batch_size]
            indices = list(range(start, start + len(batch)))
            captions = vlm.describe(batch, max_new_tokens=max_new_tokens, batch_size=len(batch),
                                    activation="down_proj_input", image_activations=True)
            for method in ("contribution", "random"):
                tables.append(find_neurons(vlm, batch, method=method, top_k=top_k, seed=seed,
                                           captions=captions, image_indices=indices))
        stream.add(captions, indices)
        for caption in captions:
            texts.append(caption.text)
            nouns_of.append(list(dict.fromkeys(caption.nouns)))
            acts = caption.activations
            if not caption.nouns or acts.steps.shape[0] == 0:
                continue
            on_image = acts.image.abs().float().mean(1).double().cpu()           # (L, F)
            on_text = acts.steps.abs().float().mean(0).double().cpu()            # (L, F)
            for noun in nouns_of[-1]:
                entry = sums.setdefault(noun, [torch.zeros_like(on_image), torch.zeros_like(on_text), 0])
                entry[0] += on_image
                entry[1] += on_text
                entry[2] += 1
        del captions                                                              # free the batch
        bar.update(len(batch))
    bar.close()
    found = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    unit_examples = stream.result()
    table = flag_generic(_atlas_rows(found, unit_examples, nouns_of, sums, units_per_noun, min_frequency))
    table.attrs.update(n_images=len(images), top_k=top_k, examples=examples, seed=seed)
    if return_parts:
        return table, dict(examples=unit_examples, found=found, captions=texts, nouns=nouns_of)
    return table


def _check_covers(ident: Identification, images: list, top_k: int) -> int:
    """``ident.n_images`` when ``ident`` identified the first images of ``images`` as the atlas
    needs (see :func:`build_atlas`); ``ValueError`` saying what differs otherwise."""
    methods = set(ident.settings.get("methods") or ident.table["method"].unique())
    if not {"contribution", "random"} <= methods:
        raise ValueError(f"the atlas reads ident's contribution and random units; it holds "
                         f"{', '.join(sorted(methods))}")
    if int(ident.settings.get("top_k", top_k)) < top_k:
        raise ValueError(f"top_k={top_k} but ident holds the top {ident.settings['top_k']} units "
                         "per noun; identify with a larger top_k")
    return covered_images(ident, images)


def _atlas_rows(found, unit_examples: UnitExamples, nouns_of, sums, units_per_noun, min_frequency):
    rows = []
    n_images = len(nouns_of)
    if not len(found):
        return pd.DataFrame(columns=ATLAS_COLUMNS)
    for noun, noun_rows in found.groupby("noun", sort=True):
        contains = np.array([noun in said for said in nouns_of])
        n_noun = int(contains.sum())
        if n_noun == 0:
            continue
        ours = noun_rows[noun_rows["method"] == "contribution"]
        rand = noun_rows[noun_rows["method"] == "random"]
        random_purity = float(np.nanmean(purity(
            unit_examples, rand[["layer", "unit"]].to_numpy(), rand["polarity"].to_numpy(), contains)))\
            if len(rand) else float("nan")
        stats = (ours.groupby(["layer", "unit"])
                 .agg(n=("image", "nunique"), mean_score=("score", "mean"),
                      polarity=("polarity", lambda p: 1 if p.sum() >= 0 else -1))
                 .reset_index())
        stats["frequency"] = stats["n"] / n_noun
        stats = stats.sort_values(["frequency", "mean_score"], ascending=False, ignore_index=True)
        keep = stats[(stats.index < units_per_noun) | (stats["frequency"] >= min_frequency)]
        units = keep[["layer", "unit"]].to_numpy()
        signs = keep["polarity"].to_numpy()
        pur = purity(unit_examples, units, signs, contains)
        s_image, s_text, count = sums.get(noun, (None, None, 0))
        for (layer, unit, sign, freq, score), p in zip(
                keep[["layer", "unit", "polarity", "frequency", "mean_score"]].itertuples(index=False), pur):
            same = ours[(ours["layer"] == layer) & (ours["unit"] == unit)]
            lens = same[same["polarity"] == sign].iloc[0]
            if count:
                i, c = float(s_image[layer, unit]) / count, float(s_text[layer, unit]) / count
                modality = i / (i + c) if i + c > 0 else float("nan")
            else:
                modality = float("nan")
            ex_images, ex_scores = unit_examples.top(int(layer), int(unit), int(sign))
            rows.append(dict(noun=noun, layer=int(layer), unit=int(unit), polarity=int(sign),
                             frequency=float(freq), n_images=n_noun, base_rate=n_noun / n_images,
                             mean_score=float(score), top_tokens=list(lens["top_tokens"]),
                             noun_rank=int(lens["noun_rank"]), purity=float(p),
                             purity_random=random_purity, modality=modality,
                             example_images=[int(x) for x in ex_images],
                             example_scores=[float(x) for x in ex_scores]))
    return pd.DataFrame(rows, columns=ATLAS_COLUMNS)


def flag_generic(table: pd.DataFrame) -> pd.DataFrame:
    """Add ``noun_share`` and ``generic`` (see the module doc) to atlas rows."""
    table = table.copy()
    n_nouns = table["noun"].nunique()
    nouns_per_unit = table.groupby(["layer", "unit"])["noun"].transform("nunique")
    table["noun_share"] = nouns_per_unit / max(n_nouns, 1)
    table["generic"] = is_generic(nouns_per_unit, n_nouns)
    return table


def write_atlas(table: pd.DataFrame, path: str | Path, meta: dict | None = None) -> Path:
    """Write the atlas to ``path`` (parquet) atomically (a temporary file, then a rename);
    ``meta`` (JSON-able, e.g. the run's description) goes in the schema metadata."""
    return write_parquet(table, path, {_META_KEY: json.dumps(meta or {}).encode()})


def read_atlas(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """``(table, meta)`` of an atlas parquet written by :func:`write_atlas` (list columns as lists)."""
    import pyarrow.parquet as pq

    arrow = pq.read_table(path)
    meta = json.loads((arrow.schema.metadata or {}).get(_META_KEY, b"{}"))
    table = arrow.to_pandas()
    for column in ("top_tokens", "example_images", "example_scores"):
        if column in table:
            table[column] = [list(v) for v in table[column]]
    return table, meta


def summary(table: pd.DataFrame) -> dict:
    """Headline numbers: nouns, units, and mean purity of the atlas units vs random units
    (each noun's random purity counted once per atlas row, so the two are paired);
    ``purity_top_unit``: the mean purity of each noun's most frequent unit (ties: the
    higher mean score), one per noun; ``purity_specific`` / ``purity_random_specific``: the
    same means over the noun-specific (not ``generic``) rows, and ``n_generic_units``."""
    if not len(table):
        nan = float("nan")
        return dict(n_nouns=0, n_units=0, n_rows=0, purity_contribution=nan, purity_random=nan,
                    purity_top_unit=nan, base_rate=nan, modality=nan, n_generic_units=0,
                    purity_specific=nan, purity_random_specific=nan)
    top = (table.sort_values(["noun", "frequency", "mean_score"], ascending=[True, False, False])
           .groupby("noun").head(1))
    if "generic" not in table:    # an atlas written before the column existed
        table = flag_generic(table)
    generic, specific = table[table["generic"]], table[~table["generic"]]
    return dict(n_nouns=int(table["noun"].nunique()),
                n_units=int(len(table[["layer", "unit"]].drop_duplicates())),
                n_rows=int(len(table)),
                purity_contribution=float(table["purity"].mean()),
                purity_random=float(table["purity_random"].mean()),
                purity_top_unit=float(top["purity"].mean()),
                base_rate=float(table["base_rate"].mean()),
                modality=float(table["modality"].mean()),
                n_generic_units=int(len(generic[["layer", "unit"]].drop_duplicates())),
                purity_specific=float(specific["purity"].mean()),
                purity_random_specific=float(specific["purity_random"].mean()))
