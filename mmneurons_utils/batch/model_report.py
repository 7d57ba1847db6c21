"""What a real vocabulary changes: the paper's headline numbers for one model, in one run.

    mmneurons report --model smol-llava --scenes 80 --json
    mmneurons report --model tiny-llava --scenes 48 --json

(:mod:`mmneurons_utils.commands.report`; ``python -m mmneurons_utils.batch.model_report`` is an
alias of it.)

Every number is given per method on the first ``--scenes`` held-out scenes of ``--seed``:
``contribution`` (the paper's), ``noun_contrast`` (beyond the paper: minus the mean over the
other candidate nouns), ``random`` units, and the ``selection_null`` (contribution's ranking on
activations shuffled within each layer, same layers and magnitudes; 5 draws):

* ``noun_hit`` (share of a noun's top-``k`` units whose top-10 tokens name it) and
  ``noun_rank`` (median rank of the noun in their logit lens); ``chance_top10`` = 10 / V;
* ``nulls``: the selection-matched null's hit and rank; ``ceiling``: how many of the nouns
  some unit of the model names at all, the hit where it can be scored, the hub tokens and the
  hit with them left out of the lens; ``lens``: hit and rank in the raw, RMS-normalised and
  norm-folded lenses (:func:`~mmneurons_utils.method.scoring.lens_unembedding`);
* ``negative_share``: units with a negative coefficient at the noun step;
* ``upper_half_share`` / ``mean_relative_layer``: where the top units sit (0 = first layer);
* ``mass_in_box``, ``pointing``, ``auroc``: specificity (scenes' boxes); ``specificity``: the
  same on median-centred maps and on occlusion-difference maps;
* ``jaccard_same`` vs ``jaccard_different``: cross-image invariance;
* ``region_retained``: top units kept after shuffling the image tokens (``--region`` scenes);
* ``text_twin_*``: overlap with each noun's text-only units;
* ``removed_k``: share of nouns that leave the caption when the top-``k_ablate`` units' write
  vectors are zeroed (``--ablate`` scenes); ``methods``: per scoring method its hit, median
  rank, share of generic units (in the top-``k`` of half the nouns) and ``removed_k50``.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pandas as pd

from ..interventions.causal import causal_curves, summarize as causal_summary
from ..method.identification import Identification
from ..method.identify import identify
from ..model.vlm import load_vlm
from ..properties.invariance import cross_image_invariance, region_invariance
from ..properties.nameability import ceiling_summary, generic_share, noun_hit_table
from ..properties.specificity import specificity_scores
from ..properties.text_twin import text_twin_overlap, twin_prompts
from ..tiny.scenes import make_scenes

METHODS = ("contribution", "noun_contrast", "random", "selection_null")
SCORING = ("contribution", "noun_contrast")          # the methods the ``methods`` block compares


def _by_method(frame: pd.DataFrame, column: str) -> dict[str, float | None]:
    """Per method, the mean of ``column`` (``None`` where it is not measured, e.g. mass in box
    for a model without a patch grid)."""
    if column not in frame:
        return {m: None for m in METHODS}
    means = frame.groupby("method")[column].mean()
    return {m: (None if np.isnan(v := float(means.get(m, np.nan))) else round(v, 4)) for m in METHODS}


def _mean(frame: pd.DataFrame, method: str, column: str, how: str = "mean") -> float | None:
    """:func:`_column_mean` of ``method``'s rows."""
    return _column_mean(frame[frame["method"] == method], column, how)


def identification_numbers(vlm, scenes, ident: Identification, k: int, occlusion: bool = True) -> dict:
    """Noun hit / rank with their nulls and ceiling, polarity, layers, specificity and
    cross-image invariance of ``ident`` (the :class:`Identification` of ``scenes``)."""
    table = ident.table
    top = table[table["rank"] < k]
    ours = top[top.method == "contribution"]
    hits = {lens: noun_hit_table(vlm, ident, k, lens=lens) for lens in ("raw", "rms", "norm")}
    raw = hits["raw"]
    spec = specificity_scores(vlm, scenes, ident, k=k, occlusion=occlusion)
    cross = cross_image_invariance(ident, k=k)
    cross = cross[cross.status == "ok"]
    relative = ours.layer / max(vlm.n_layers - 1, 1)
    counts = ceiling_summary(raw[raw.method == "contribution"])
    return dict(
        noun_hit=_by_method(raw, "noun_hit"), noun_rank=_by_method(raw, "noun_rank"),
        chance_top10=round(10 / vlm.lm_head.out_features, 6),
        nulls=dict(hit_selection_null=_mean(raw, "selection_null", "noun_hit"),
                   rank_selection_null=_mean(raw, "selection_null", "noun_rank"),
                   hit_random=_mean(raw, "random", "noun_hit"), rank_random=_mean(raw, "random", "noun_rank")),
        ceiling=dict(**counts, hit_where_nameable=_mean(raw, "contribution", "hit_where_nameable"),
                     hit_where_nameable_selection_null=_mean(raw, "selection_null", "hit_where_nameable"),
                     hit_no_hubs=_mean(raw, "contribution", "noun_hit_no_hubs"),
                     hit_no_hubs_selection_null=_mean(raw, "selection_null", "noun_hit_no_hubs"),
                     n_hubs=len(raw.attrs["hubs"]), hubs=raw.attrs["hubs"][:12]),
        lens={lens: dict(hit=_mean(frame, "contribution", "noun_hit"),
                         median_rank=_mean(frame, "contribution", "noun_rank", "median"),
                         hit_selection_null=_mean(frame, "selection_null", "noun_hit"),
                         median_rank_selection_null=_mean(frame, "selection_null", "noun_rank", "median"))
              for lens, frame in hits.items()},
        negative_share=round(float((ours.polarity < 0).mean()), 4),
        upper_half_share=round(float((ours.layer >= vlm.n_layers / 2).mean()), 4),
        mean_relative_layer=round(float(relative.mean()), 4),
        layer_shares={int(l): round(float(s), 4) for l, s in ours.layer.value_counts(normalize=True).sort_index().items()},
        mass_in_box=_by_method(spec, "mass_in_box"), box_share=_by_method(spec, "box_share"),
        pointing=_by_method(spec, "pointing_hit"),
        auroc=_by_method(spec, "auroc"),
        specificity={f"{column}{suffix}": _mean(spec, method, column)
                     for column in ("mass_in_box_centred", "occlusion_mass_in_box", "pointing_hit_centred",
                                    "occlusion_pointing_hit")
                     for method, suffix in (("contribution", ""), ("random", "_random"),
                                            ("selection_null", "_selection_null"), ("noun_contrast", "_noun_contrast"))}
        | dict(box_share=_mean(spec, "contribution", "box_share"), maps="centred: each map minus its median; "
               "occlusion: p·(a − a with the noun's box painted with the background)"),
        jaccard_same=_by_method(cross, "jaccard_same"), jaccard_different=_by_method(cross, "jaccard_different"),
        _hits=raw)


def report(vlm, n_scenes: int = 48, seed: int = 0, k: int = 10, n_region: int = 12,
           n_ablate: int = 8, k_ablate: int = 50, progress: bool = False, occlusion: bool = True,
           ident: Identification | None = None, store=None) -> dict:
    """The numbers of the module doc for ``vlm`` (a dict, JSON-able).

    Everything is read from one :class:`Identification` of the ``n_scenes`` scenes (methods
    :data:`METHODS`, ``top_k = max(k, k_ablate)``, image activations): ``ident`` when given
    (it must be of these scenes with those settings), else
    :func:`~mmneurons_utils.method.identify.identify` (loaded from ``store`` when it holds it);
    region invariance and ablation take its first scenes (``ident.subset``)."""
    start = time.perf_counter()
    scenes = make_scenes(n_scenes, seed=seed)
    images = [s.image for s in scenes]
    if ident is None:
        ident = identify(vlm, images, store=store, methods=METHODS, top_k=max(k, k_ablate), seed=seed,
                         image_activations=True, progress=progress)
    elif ident.n_images != n_scenes or not set(METHODS) <= set(ident.table["method"]):
        raise ValueError(f"the identification holds {ident.n_images} images and methods "
                         f"{sorted(ident.table['method'].unique())}; the report needs the {n_scenes} "
                         f"scenes of seed {seed} with {', '.join(METHODS)}")
    table, captions = ident.table, ident.captions
    out = dict(model=vlm.name, n_scenes=n_scenes, seed=seed, k=k, vocabulary=vlm.lm_head.out_features,
               layers=vlm.n_layers, units=vlm.n_layers * vlm.d_ff,
               captions_with_nouns=round(float(np.mean([bool(c.nouns) for c in captions])), 4),
               noun_instances=int(((table.method == "contribution") & (table["rank"] == 0)).sum()))
    out.update(identification_numbers(vlm, scenes, ident, k, occlusion=occlusion))
    hits = out.pop("_hits")
    # the text twin's cloze prompts, run once for both scoring methods
    prompts = twin_prompts(vlm, sorted(table.loc[table.method.isin(SCORING), "noun"].unique()))
    twin = text_twin_overlap(vlm, ident, k=k, seed=seed, prompts=prompts)
    out.update(text_twin_retained=_column_mean(twin, "retained"),
               text_twin_jaccard=_column_mean(twin, "jaccard"),
               text_twin_random=_column_mean(twin, "random_retained"),
               text_twin_other_nouns=_column_mean(twin, "other_nouns"),
               text_twin_nouns=int(twin["retained"].notna().sum()),
               text_twin_noun_probability=_column_mean(twin, "noun_probability", "median"))
    region = region_invariance(vlm, images[:n_region], ident.subset(range(min(n_region, n_scenes))),
                               top_k=k, seed=seed, methods=("contribution", "random"))
    out.update(region_retained=_by_method(region, "retained"), region_scenes=n_region)
    ablate = ident.subset(range(min(n_ablate, n_scenes)))
    curves = causal_curves(vlm, ablate, images[:n_ablate], ks=(k_ablate,), seed=seed)
    removed = _by_method(causal_summary(curves), "noun_removed")
    out.update(removed_k=removed, k_ablate=k_ablate, ablate_scenes=n_ablate,
               ablate_nouns=int(((ablate.table.method == "contribution") & (ablate.table["rank"] == 0)).sum()))
    twins = {"contribution": twin, "noun_contrast": text_twin_overlap(vlm, ident, k=k, seed=seed,
                                                                      method="noun_contrast", prompts=prompts)}
    out["methods"] = {m: dict(hit=_mean(hits, m, "noun_hit"), median_rank=_mean(hits, m, "noun_rank", "median"),
                              generic_share=round(generic_share(ident, k, m), 4),
                              **{f"removed_k{k_ablate}": removed.get(m)},
                              text_twin_retained=_column_mean(twins[m], "retained"),
                              text_twin_other_nouns=_column_mean(twins[m], "other_nouns"))
                      for m in SCORING}
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def _column_mean(frame: pd.DataFrame, column: str, how: str = "mean") -> float | None:
    """The mean (or median) of ``column``'s values, rounded; ``None`` where it has none."""
    if column not in frame or frame[column].dropna().empty:
        return None
    values = frame[column].dropna().astype(float)
    return round(float(values.median() if how == "median" else values.mean()), 4)


if __name__ == "__main__":   # the old entry point: the process becomes ``mmneurons report``
    os.execv(sys.executable, [sys.executable, "-m", "mmneurons_utils.cli", "report", *sys.argv[1:]])
