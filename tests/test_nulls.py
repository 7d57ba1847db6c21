"""The verdicts' baselines: noun_contrast, the selection-matched null, ceilings, hub tokens, lenses.

Each test can fail on the science: a generic unit must lose to a specific one under
noun_contrast, the null must select the same layers as contribution, the ceiling must match a
brute-force count.
"""

from collections import namedtuple

import numpy as np
import pandas as pd
import pytest
import torch

from mmneurons_utils import find_neurons, make_scenes
from mmneurons_utils.method import scoring, vocabulary
from mmneurons_utils.method.identify import contrast_weights, find_neurons_by_method
from mmneurons_utils.model.nouns import noun_token_id
from mmneurons_utils.method.identification import Identification
from mmneurons_utils.properties.nameability import generic_share, generic_units, noun_hit_table
from mmneurons_utils.properties.sensitivity import noun_hits

Target = namedtuple("Target", "noun step token_id")
CANDIDATES = ["dog", "cat", "car", "tree", "apple", "bird"]


@pytest.fixture(scope="module")
def handmade():
    """A random tiny-llava whose last layer has a unit writing only "dog" (A) and a unit
    writing every candidate noun (B); the candidates' unembeddings are orthogonal, equal norm."""
    from mmneurons_utils.model.vlm import VLM
    from mmneurons_utils.tiny.build import build_tiny_llava

    model, processor = build_tiny_llava(seed=1)
    vlm = VLM.from_parts(model, processor, family="tiny-llava")
    ids = [noun_token_id(vlm.tokenizer, n) for n in CANDIDATES]
    d = vlm.lm_head.weight.shape[1]
    basis = torch.linalg.qr(torch.randn(d, len(ids), generator=torch.Generator().manual_seed(0)))[0].T
    with torch.no_grad():
        vlm.lm_head.weight[ids] = basis * 3.0
        last = vlm.down_proj(vlm.n_layers - 1).weight                    # (D, F)
        last[:, 0] = basis[0]                                             # A: "dog" only
        last[:, 1] = basis.sum(0)                                         # B: every candidate
    return vlm, ids


def test_contribution_ranks_the_generic_writer_first_noun_contrast_the_specific_one(handmade):
    vlm, ids = handmade
    acts = torch.zeros(vlm.n_layers, vlm.d_ff)
    acts[-1, 0], acts[-1, 1] = 1.0, 1.5                      # the generic unit fires harder
    target = Target("dog", 0, ids[0])
    contribution = scoring.contribution_scores(vlm, acts, ids[0])
    contrast = acts * contrast_weights(vlm, [target], CANDIDATES)[ids[0]]
    last = vlm.n_layers - 1
    assert scoring.top_units(contribution, 1)[0].tolist() == [[last, 1]]       # generic first
    assert scoring.top_units(contrast, 1)[0].tolist() == [[last, 0]]           # specific first
    assert abs(float(contrast[last, 1])) < 1e-4 * float(contrast[last, 0])     # writes all alike: 0


def test_noun_contrast_needs_candidates(handmade):
    from mmneurons_utils.method.identify import candidate_token_ids

    vlm, ids = handmade
    vocabulary_before, vlm.noun_vocabulary = vlm.noun_vocabulary, None
    try:
        with pytest.raises(ValueError, match="noun_contrast needs candidate nouns"):
            candidate_token_ids(vlm)
        with pytest.raises(ValueError, match="at least two candidate nouns"):
            candidate_token_ids(vlm, ["dog"])
        assert candidate_token_ids(vlm, CANDIDATES) == sorted(ids)
    finally:
        vlm.noun_vocabulary = vocabulary_before


@pytest.fixture(scope="module")
def identified(tiny_llava):
    scenes = make_scenes(12, seed=0)
    return find_neurons_by_method(tiny_llava, [s.image for s in scenes], top_k=10,
                                  methods=("contribution", "noun_contrast", "selection_null", "random"))


def test_selection_null_selects_the_layers_of_contribution(identified):
    table = identified.table
    ours = table[table.method == "contribution"]
    null = table[table.method == "selection_null"]
    assert sorted(null["draw"].unique()) == [0, 1, 2, 3, 4]
    assert "draw" in table and table.loc[table.method == "contribution", "draw"].isna().all()
    for (image, noun), rows in ours.groupby(["image", "noun"]):
        expected = np.bincount(rows.layer, minlength=4)
        draws = null[(null.image == image) & (null.noun == noun)]
        for _, draw in draws.groupby("draw"):
            assert (np.bincount(draw.layer, minlength=4) == expected).all()
    # the draws differ (shuffled activations), and the null's polarity makes every score positive
    sets = {d: frozenset(map(tuple, g[["layer", "unit"]].to_numpy()))
            for d, g in null[(null.image == 0) & (null.noun == null.noun.iloc[0])].groupby("draw")}
    assert len(set(sets.values())) > 1
    assert (null.score > 0).all()


def test_selection_null_is_seeded(tiny_llava):
    image = make_scenes(1, seed=0)[0].image
    a = find_neurons(tiny_llava, image, method="selection_null", top_k=10, seed=3, null_draws=2)
    b = find_neurons(tiny_llava, image, method="selection_null", top_k=10, seed=3, null_draws=2)
    c = find_neurons(tiny_llava, image, method="selection_null", top_k=10, seed=4, null_draws=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a[["layer", "unit"]].equals(c[["layer", "unit"]])


def test_contribution_names_the_noun_more_than_its_selection_null(tiny_llava, identified):
    hits = noun_hit_table(tiny_llava, identified, k=10)
    means = hits.groupby("method").noun_hit.mean()
    assert means["contribution"] > means["selection_null"] > means["random"]
    # one row per noun instance for every method (the null's five draws averaged)
    counts = hits.groupby("method").size()
    assert counts["selection_null"] == counts["contribution"]
    # the raw lens agrees with the table's own noun_rank column (one reading of the lens)
    plain = noun_hits(identified, 10)
    plain = plain[plain.method == "contribution"]
    merged = plain.merge(hits, on=["image", "noun", "method"], suffixes=("", "_new"))
    assert np.allclose(merged.noun_hit, merged.noun_hit_new)
    assert np.allclose(merged.noun_rank, merged.noun_rank_new)


def _brute_force_top10(vlm):
    """Per unit, the set of tokens in its top-10 of +lens or −lens, by a full sort."""
    w_u = vlm.lm_head.weight.detach().double().numpy()
    sets = []
    for layer in range(vlm.n_layers):
        lens = w_u @ vlm.down_proj(layer).weight.detach().double().numpy()      # (V, F)
        order = np.argsort(-lens, axis=0, kind="stable")
        for unit in range(vlm.d_ff):
            sets.append(set(order[:10, unit]) | set(order[-10:, unit]))
    return sets


def test_ceiling_and_hubs_match_a_brute_force_count(tiny_llava):
    sets = _brute_force_top10(tiny_llava)
    ids = [noun_token_id(tiny_llava.tokenizer, n) for n in tiny_llava.noun_vocabulary]
    expected = [sum(t in s for s in sets) for t in ids]
    assert vocabulary.naming_units(tiny_llava, ids).tolist() == expected
    counts = np.bincount([t for s in sets for t in s], minlength=tiny_llava.lm_head.out_features)
    assert vocabulary.unit_token_counts(tiny_llava).tolist() == counts.tolist()
    hubs = vocabulary.hub_tokens(tiny_llava, share=0.3, over_chance=0)
    assert len(vocabulary.hub_tokens(tiny_llava)) == 0       # 75 tokens: none 5 × above chance
    assert set(hubs.tolist()) == set(np.flatnonzero(counts > 0.3 * len(sets)).tolist())


def test_hit_where_nameable_and_without_hubs(tiny_llava, identified):
    hits = noun_hit_table(tiny_llava, identified, k=10, hub_share=0.3, over_chance=0)
    assert hits.attrs["hubs"]
    nameable = hits[hits.nameable]
    assert (hits.naming_units > 0).equals(hits.nameable)
    assert hits.hit_where_nameable.isna().equals(~hits.nameable)
    assert np.allclose(nameable.hit_where_nameable, nameable.noun_hit)
    # leaving hub tokens out can only keep or raise a non-hub noun's hit (fewer tokens compete)
    both = hits.dropna(subset=["noun_hit_no_hubs"])
    assert (both.noun_hit_no_hubs >= both.noun_hit - 1e-9).all()
    assert (hits.chance == 10 / tiny_llava.lm_head.out_features).all()


def test_lenses(tiny_llava):
    units = np.array([[3, 5], [2, 7]])
    w_u = tiny_llava.lm_head.weight.detach().float()
    columns = torch.stack([tiny_llava.down_proj(l).weight.detach()[:, u] for l, u in units], 1)
    rms = (w_u / w_u.pow(2).mean(1, keepdim=True).sqrt()) @ columns
    gain = tiny_llava.final_norm.weight.detach().float()
    norm = (w_u * gain) @ columns
    for lens, full in (("rms", rms), ("norm", norm), ("raw", w_u @ columns)):
        top, _ = scoring.unit_logit_lens(tiny_llava, units, 5, lens=lens)
        assert top == full.topk(5, dim=0).indices.T.tolist()
    with pytest.raises(ValueError, match="lens must be one of raw, rms, norm"):
        scoring.unit_logit_lens(tiny_llava, units, 5, lens="cosine")


def test_excluded_tokens_leave_the_lens(tiny_llava):
    units = np.array([[3, 5]])
    top, _ = scoring.unit_logit_lens(tiny_llava, units, 5)
    without, _ = scoring.unit_logit_lens(tiny_llava, units, 5, exclude=top[0][:2])
    assert without[0][:3] == top[0][2:5] and not set(top[0][:2]) & set(without[0])


def test_generic_share_counts_units_shared_by_nouns():
    rows = [dict(image=i, noun=n, method="contribution", rank=r, layer=3, unit=u)
            for i, n in enumerate(["dog", "cat", "car", "tree"])
            for r, u in enumerate([7, 100 + i])]          # unit 7 in every noun's top 2
    ident = Identification(pd.DataFrame(rows), [None] * 4, [f"image-{i}" for i in range(4)])
    assert generic_share(ident, k=2) == 0.5
    assert generic_share(ident, k=1) == 1.0
    assert generic_units(ident, k=2) == {(3, 7)} and generic_units(ident, k=2, method="random") == set()


def test_causal_curves_take_every_null_draw(tiny_llava, identified):
    from mmneurons_utils.interventions.causal import causal_curves
    part = identified.subset([0, 1])
    images = [s.image for s in make_scenes(2, seed=0)]
    curves = causal_curves(tiny_llava, part, images, ks=(5,),
                           methods=("contribution", "noun_contrast", "selection_null"))
    assert sorted(curves[curves.method == "selection_null"].draw.unique()) == [0, 1, 2, 3, 4]
    assert set(curves.method) == {"contribution", "noun_contrast", "selection_null"}


def test_lens_extremes_are_cached_on_disk_and_rebuilt_when_corrupt(tiny_llava, tmp_path, monkeypatch):
    monkeypatch.setenv("MMNEURONS_CACHE", str(tmp_path))
    tiny_llava.__dict__.pop("_lens_extremes", None)
    first = vocabulary.lens_extremes(tiny_llava)
    (path,) = (tmp_path / "lens").glob("*-raw-k10.npy")
    assert (np.load(path) == first).all()
    path.write_bytes(b"not an array")                     # a truncated / corrupted cache file
    tiny_llava.__dict__.pop("_lens_extremes", None)
    again = vocabulary.lens_extremes(tiny_llava)
    assert (again == first).all() and (np.load(path) == first).all()
    tiny_llava.__dict__.pop("_lens_extremes", None)


def test_method_comparison_and_per_layer(tiny_llava, identified):
    from mmneurons_utils.properties.nameability import method_comparison, per_layer

    table = identified.table
    comparison = method_comparison(tiny_llava, identified, k=10)
    assert set(comparison.index) == {"contribution", "noun_contrast", "selection_null", "random"}
    assert comparison.loc["contribution", "noun_hit"] > comparison.loc["selection_null", "noun_hit"]
    assert comparison.loc["random", "median_rank"] > comparison.loc["contribution", "median_rank"]
    layers = per_layer(tiny_llava, identified, k=10)
    for _, part in layers.groupby("method"):
        assert abs(part.share.sum() - 1) < 1e-9
    ours = layers[layers.method == "contribution"].set_index("layer")
    top = table[(table.method == "contribution") & (table["rank"] < 10)]
    assert np.isclose(ours.loc[3, "noun_hit"], (top[top.layer == 3].noun_rank < 10).mean())


def test_find_command_takes_the_new_methods(cli, tmp_path):
    import json

    for method, draws in (("noun_contrast", None), ("selection_null", 5)):
        out = tmp_path / f"{method}.parquet"
        code, stdout, _ = cli("find", "--model", "tiny-llava", "--scenes", "2", "--method", method,
                              "--top-k", "5", "--out", str(out), "--json")
        assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["method"] == method
        table = pd.read_parquet(out)
        assert set(table.method) == {method}
        assert (sorted(table.draw.unique()) == list(range(draws))) if draws else "draw" not in table
    code, _, stderr = cli("find", "--model", "tiny-llava", "--scenes", "2", "--method", "contrast",
                          "--out", str(tmp_path / "x.parquet"))
    assert code == 2 and "noun_contrast" in stderr and "selection_null" in stderr


def test_text_twin_per_method(tiny_llava, identified):
    from mmneurons_utils.properties.text_twin import text_twin_overlap

    ours = text_twin_overlap(tiny_llava, identified, k=10, greedy_only=False)
    contrast = text_twin_overlap(tiny_llava, identified, k=10, greedy_only=False, method="noun_contrast")
    assert list(ours.noun) == list(contrast.noun)
    assert not np.allclose(ours.retained, contrast.retained)        # other units on both sides
    with pytest.raises(ValueError, match="contribution or noun_contrast"):
        text_twin_overlap(tiny_llava, identified, method="gradient")
