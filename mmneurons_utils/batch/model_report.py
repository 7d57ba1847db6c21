"""What a real vocabulary changes: the paper's headline numbers for one model, in one run.

    python -m mmneurons_utils.batch.model_report --model smol-llava --scenes 48 --json
    python -m mmneurons_utils.batch.model_report --model tiny-llava --scenes 48 --json

Every number is the contribution method's beside the ``random`` units' (the chance level),
on the first ``--scenes`` held-out scenes of ``--seed``:

* ``noun_hit`` (share of a noun's top-``k`` units whose top-10 tokens name it) and
  ``noun_rank`` (median rank of the noun in their logit lens); ``chance_top10`` = 10 / V;
* ``negative_share``: units with a negative coefficient at the noun step;
* ``upper_half_share`` / ``mean_relative_layer``: where the top units sit (0 = first layer);
* ``mass_in_box``, ``pointing``, ``auroc``: specificity (scenes' boxes);
* ``jaccard_same`` vs ``jaccard_different``: cross-image invariance;
* ``region_retained``: top units kept after shuffling the image tokens (``--region`` scenes);
* ``text_twin_retained`` / ``_random`` / ``_other_nouns``: overlap with each noun's text-only units;
* ``removed_k``: share of nouns that leave the caption when the top-``k_ablate`` units' write
  vectors are zeroed (``--ablate`` scenes).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd

from ..interventions.causal import causal_curves, summarize as causal_summary
from ..method.identify import find_neurons_by_method
from ..model.vlm import load_vlm
from ..properties.invariance import cross_image_invariance, region_invariance
from ..properties.sensitivity import noun_hits
from ..properties.specificity import specificity_scores
from ..properties.text_twin import text_twin_overlap
from ..tiny.scenes import make_scenes

METHODS = ("contribution", "random")


def _by_method(frame: pd.DataFrame, column: str) -> dict[str, float | None]:
    """Per method, the mean of ``column`` (``None`` where it is not measured, e.g. mass in box
    for a model without a patch grid)."""
    if column not in frame:
        return {m: None for m in METHODS}
    means = frame.groupby("method")[column].mean()
    return {m: (None if np.isnan(v := float(means.get(m, np.nan))) else round(v, 4)) for m in METHODS}


def identification_numbers(vlm, scenes, captions, table: pd.DataFrame, k: int) -> dict:
    """Noun hit / rank, polarity, layers, specificity and cross-image invariance."""
    top = table[table["rank"] < k]
    ours = top[top.method == "contribution"]
    hits = noun_hits(table, k)
    spec = specificity_scores(vlm, scenes, captions, table, k=k)
    cross = cross_image_invariance(table, k=k)
    cross = cross[cross.status == "ok"]
    relative = ours.layer / max(vlm.n_layers - 1, 1)
    return dict(
        noun_hit=_by_method(hits, "noun_hit"), noun_rank=_by_method(hits, "noun_rank"),
        chance_top10=round(10 / vlm.lm_head.out_features, 6),
        negative_share=round(float((ours.polarity < 0).mean()), 4),
        upper_half_share=round(float((ours.layer >= vlm.n_layers / 2).mean()), 4),
        mean_relative_layer=round(float(relative.mean()), 4),
        layer_shares={int(l): round(float(s), 4) for l, s in ours.layer.value_counts(normalize=True).sort_index().items()},
        mass_in_box=_by_method(spec, "mass_in_box"), box_share=_by_method(spec, "box_share"),
        pointing=_by_method(spec, "pointing_hit"),
        auroc=_by_method(spec, "auroc"),
        jaccard_same=_by_method(cross, "jaccard_same"), jaccard_different=_by_method(cross, "jaccard_different"))


def report(vlm, n_scenes: int = 48, seed: int = 0, k: int = 10, n_region: int = 12,
           n_ablate: int = 8, k_ablate: int = 50, progress: bool = False) -> dict:
    """The numbers of the module doc for ``vlm`` (a dict, JSON-able)."""
    start = time.perf_counter()
    scenes = make_scenes(n_scenes, seed=seed)
    images = [s.image for s in scenes]
    table, captions = find_neurons_by_method(vlm, images, methods=METHODS, top_k=max(k, k_ablate),
                                             seed=seed, image_activations=True, progress=progress)
    out = dict(model=vlm.name, n_scenes=n_scenes, seed=seed, k=k, vocabulary=vlm.lm_head.out_features,
               layers=vlm.n_layers, units=vlm.n_layers * vlm.d_ff,
               captions_with_nouns=round(float(np.mean([bool(c.nouns) for c in captions])), 4))
    out.update(identification_numbers(vlm, scenes, captions, table, k))
    twin = text_twin_overlap(vlm, table, k=k, seed=seed)
    out.update(text_twin_retained=round(float(twin.retained.mean()), 4),
               text_twin_jaccard=round(float(twin.jaccard.mean()), 4),
               text_twin_random=round(float(twin.random_retained.mean()), 4),
               text_twin_other_nouns=round(float(twin.other_nouns.mean()), 4),
               text_twin_nouns=int(len(twin)))
    region = region_invariance(vlm, images[:n_region], top_k=k, seed=seed, methods=METHODS)
    out.update(region_retained=_by_method(region, "retained"), region_scenes=n_region)
    ablate_table = table[table.image < n_ablate]
    curves = causal_curves(vlm, images[:n_ablate], ks=(k_ablate,), table=ablate_table, seed=seed)
    summary = causal_summary(curves)
    out.update(removed_k=_by_method(summary, "noun_removed"), k_ablate=k_ablate, ablate_scenes=n_ablate,
               seconds=round(time.perf_counter() - start, 1))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--region", type=int, default=12, help="scenes for region invariance")
    parser.add_argument("--ablate", type=int, default=8, help="scenes for the ablation")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = report(load_vlm(args.model), args.scenes, args.seed, args.k, args.region, args.ablate,
                    progress=not args.json)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
