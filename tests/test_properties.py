"""The property metrics on hand-made cases with known answers, and on the tiny models."""

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from mmneurons_utils import find_neurons, make_scenes
from mmneurons_utils import metrics
from mmneurons_utils.properties import invariance
from mmneurons_utils.properties import sensitivity
from mmneurons_utils.properties import specificity
from mmneurons_utils.model.teacher_forcing import teacher_forced_activations
from mmneurons_utils.method.identification import Identification
from mmneurons_utils.method.identify import find_neurons_by_method
from mmneurons_utils.properties.stats import auroc, bootstrap_ci, jaccard


# --- statistics ---------------------------------------------------------------
def test_auroc_known_values():
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 1], [1, 1]) == 0.5
    assert auroc([2, 0], [1]) == 0.5
    assert np.isnan(auroc([], [1]))


def test_bootstrap_interval_brackets_the_mean_and_is_seeded():
    values = np.random.default_rng(0).normal(size=200)
    mean, low, high = bootstrap_ci(values, seed=3)
    assert low < mean < high and mean == pytest.approx(values.mean())
    assert bootstrap_ci(values, seed=3) == (mean, low, high)
    assert bootstrap_ci([np.nan, 2.0]) == (2.0, 2.0, 2.0)
    assert all(np.isnan(bootstrap_ci([np.nan])))


def test_jaccard():
    assert jaccard({1, 2}, {1, 2}) == 1.0
    assert jaccard({1}, {2}) == 0.0
    assert jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)


# --- specificity on hand-made maps ----------------------------------------------
def test_a_unit_firing_only_inside_the_box_has_all_its_mass_there():
    grid = np.zeros((8, 8))
    grid[1:3, 2:4] = 5.0                      # patches rows 1–2, cols 2–3 → pixels y 8–23, x 16–31
    grid[5, 5] = -3.0                         # negative activation elsewhere does not count
    box = (16, 8, 32, 24)
    assert specificity.mass_in_box(grid, (64, 64), [box]) == 1.0
    assert specificity.pointing_hit(grid, (64, 64), [box])
    assert specificity.box_share((64, 64), [box]) == pytest.approx(16 * 16 / 64 ** 2)
    assert specificity.mass_in_box(grid, (64, 64), [(40, 40, 64, 64)]) == 0.0
    assert not specificity.pointing_hit(grid, (64, 64), [(40, 40, 64, 64)])


def test_an_even_map_scores_the_box_share_and_a_dead_map_is_nan():
    box = (0, 0, 16, 32)
    assert specificity.mass_in_box(np.ones((8, 8)), (64, 64), [box]) == pytest.approx(
        specificity.box_share((64, 64), [box]))
    assert np.isnan(specificity.mass_in_box(-np.ones((8, 8)), (64, 64), [box]))


def test_percentile_mask_keeps_the_top_five_percent():
    heat = np.arange(400, dtype=float).reshape(20, 20)
    mask = specificity.percentile_mask(heat, 95)
    assert mask.sum() == 20 and mask[-1].all()


def test_upsample_nearest_repeats_patches():
    grid = np.arange(4, dtype=float).reshape(2, 2)
    up = specificity.upsample(grid, (4, 4))
    assert np.array_equal(up, np.kron(grid, np.ones((2, 2))))


# --- specificity on the tiny models ---------------------------------------------
@pytest.fixture(scope="module")
def scenes():
    return make_scenes(12, seed=2)


@pytest.fixture(scope="module")
def llava_run(tiny_llava, scenes):
    return find_neurons_by_method(tiny_llava, [s.image for s in scenes], top_k=20,
                                  image_activations=True)


def test_unit_maps_are_the_recorded_image_activations(tiny_llava, scenes, llava_run):
    """Independent check: a hook on one down_proj during a plain forward pass."""
    table, captions = llava_run
    layer, unit = (int(x) for x in table.iloc[0][["layer", "unit"]])
    seen = []
    handle = tiny_llava.down_proj(layer).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    inputs = tiny_llava.inputs([scenes[0].image])
    try:
        with torch.no_grad():
            tiny_llava.model(**inputs)
    finally:
        handle.remove()
    mask = tiny_llava.image_token_mask(inputs["input_ids"])[0]
    expected = seen[0][0, mask, unit].reshape(8, 8).numpy()
    got = specificity.unit_maps(tiny_llava, captions[0].activations, [[layer, unit]])[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_specificity_scores_table(tiny_llava, scenes, llava_run):
    table, captions = llava_run
    scores = specificity.specificity_scores(tiny_llava, scenes, llava_run, k=10)
    assert set(scores.method) == {"contribution", "gradient", "gradient_image", "random"}
    inside = scores[scores.in_scene]
    assert inside.mass_in_box.between(0, 1).all() and inside.auroc.dropna().between(0, 1).all()
    assert (inside.box_share > 0).all()
    with pytest.raises(ValueError, match="only the top 20 units"):
        specificity.specificity_scores(tiny_llava, scenes, llava_run, k=21)
    with pytest.raises(ValueError, match="11 scenes for an identification of 12 images"):
        specificity.specificity_scores(tiny_llava, scenes[:11], llava_run, k=10)
    only = specificity.specificity_scores(tiny_llava, scenes, llava_run, k=10, methods=["random"])
    pd.testing.assert_frame_equal(only.reset_index(drop=True),
                                  scores[scores.method == "random"].reset_index(drop=True))
    # the same numbers from a subset of the identification (its scenes in its order)
    part = specificity.specificity_scores(tiny_llava, [scenes[3], scenes[1]], llava_run.subset([3, 1]), k=10)
    mine = scores[scores.image.isin([3, 1])]
    for image, new in ((3, 0), (1, 1)):
        a = mine[mine.image == image].drop(columns=["image", "auroc"]).reset_index(drop=True)
        b = part[part.image == new].drop(columns=["image", "auroc"]).reset_index(drop=True)
        pd.testing.assert_frame_equal(a, b)         # auroc: over the images given, so it differs


def test_query_token_models_have_no_maps_but_have_selectivity(tiny_instructblip, scenes):
    assert specificity.patch_grid(tiny_instructblip) is None
    ident = find_neurons_by_method(tiny_instructblip, [s.image for s in scenes[:6]],
                                   methods=["contribution"], top_k=5, image_activations=True)
    table, captions = ident
    with pytest.raises(ValueError, match="not a patch grid"):
        specificity.unit_maps(tiny_instructblip, captions[0].activations, [[0, 0]])
    scores = specificity.specificity_scores(tiny_instructblip, scenes[:6], ident, k=5)
    assert "mass_in_box" not in scores and "auroc" in scores


def test_maps_need_image_activations(tiny_llava, scenes):
    caption = tiny_llava.describe([scenes[0].image], activation="down_proj_input")[0]
    with pytest.raises(ValueError, match="image_activations=True"):
        specificity.unit_maps(tiny_llava, caption.activations, [[0, 0]])


# --- semantic sensitivity ---------------------------------------------------------
@pytest.fixture(scope="module")
def similarity():
    return sensitivity.TextSimilarity()


def test_identical_strings_score_highest_and_disjoint_lower(similarity):
    reference = "a dog and a cat on a red background"
    candidates = [reference, "dog cat red", "pizza guitar rocket"]
    scores = similarity.score(candidates, [reference] * 3,
                              idf_corpus=[reference, "a pizza on a blue background"])
    for name in ("bertscore", "moverscore"):
        values = scores[name]
        assert values[0] == pytest.approx(1.0, abs=1e-5), name
        assert values[0] > values[1] > values[2], (name, values)
    assert scores["bleurt"] is None and "no BLEURT checkpoint" in similarity.bleurt_status


def test_candidate_text_keeps_words_in_rank_order():
    assert sensitivity.candidate_text([["▁dog", "cat", "a"], ["<s>", "dog", "Ġpuppy"]], 3) == \
        "dog cat puppy"
    assert sensitivity.candidate_text([["dog", "cat"]], 1) == "dog"


@pytest.mark.slow
def test_semantic_sensitivity_table(tiny_llava, scenes, similarity, llava_run):
    table, captions = llava_run
    frame = sensitivity.semantic_sensitivity(llava_run, similarity, k=10)
    assert set(frame.reference) == {"caption", "noun"}
    assert "bleurt" not in frame and frame.attrs["bleurt"].startswith("not computed")
    assert frame.bertscore.between(-1, 1.0001).all()
    summary = metrics.summarize_ci(frame.assign(model="m"), ["model", "method"],
                                   ["bertscore", "moverscore", "bleurt"])
    wide = metrics.paper_table(summary)
    assert (wide["bleurt"] == "not computed").all()
    with pytest.raises(ValueError, match="top 20 units"):
        sensitivity.semantic_sensitivity(llava_run, similarity, k=50)
    assert (frame[frame.reference == "caption"].reference_text ==
            [captions[i].text for i in frame[frame.reference == "caption"].image]).all()
    with pytest.raises(ValueError, match="no 'noun_contrast' rows"):
        sensitivity.semantic_sensitivity(llava_run, similarity, k=10, methods=["noun_contrast"])


def test_bad_encoder_paths_name_the_path(tmp_path):
    with pytest.raises(sensitivity.EncoderError, match=str(tmp_path / "nope")):
        sensitivity.TextSimilarity(encoder=tmp_path / "nope")
    with pytest.raises(sensitivity.EncoderError, match="BLEURT checkpoint"):
        sensitivity.TextSimilarity(bleurt_checkpoint=tmp_path)


# --- region invariance ------------------------------------------------------------
def test_teacher_forcing_reads_the_generation_time_activations(tiny_llava, scenes):
    caption = tiny_llava.describe([scenes[1].image], activation="down_proj_input")[0]
    steps = list(range(len(caption.token_ids)))
    forced = teacher_forced_activations(tiny_llava, tiny_llava.inputs([scenes[1].image]),
                                        caption.token_ids, steps)
    torch.testing.assert_close(forced, caption.activations.steps, rtol=1e-4, atol=1e-5)


def test_permutation_reaches_the_language_model_and_is_removed(tiny_llava, scenes):
    image = scenes[0].image
    inputs = tiny_llava.inputs([image])
    with torch.no_grad():
        plain = tiny_llava.model(**inputs).logits[0, -1]
        with invariance.permuted_image_tokens(tiny_llava, np.arange(64)):
            identity = tiny_llava.model(**inputs).logits[0, -1]
        with invariance.permuted_image_tokens(tiny_llava, np.arange(64)[::-1].copy()):
            reversed_ = tiny_llava.model(**inputs).logits[0, -1]
        with pytest.raises(RuntimeError):
            with invariance.permuted_image_tokens(tiny_llava, np.arange(64)):
                raise RuntimeError("inside")
        again = tiny_llava.model(**inputs).logits[0, -1]
    assert torch.equal(plain, identity) and torch.equal(plain, again)
    assert not torch.allclose(plain, reversed_)


@pytest.mark.slow
def test_a_permutation_invariant_toy_keeps_every_unit(tiny_llava, scenes):
    """With the projector's weights zeroed every image token is the same vector, so any
    permutation leaves the model's computation unchanged: retention must be exactly 1."""
    toy = copy.copy(tiny_llava)
    toy.model = copy.deepcopy(tiny_llava.model)
    with torch.no_grad():
        for module in toy.model.model.multi_modal_projector.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.zero_()
    images = [s.image for s in scenes[:4]]
    frame = invariance.region_invariance(toy, images, find_neurons_by_method(toy, images, top_k=10),
                                         top_k=10, methods=["contribution", "gradient", "random"])
    assert len(frame)
    real = frame[frame.method != "random"]
    assert (real.retained == 1.0).all() and real.caption_same.all()
    assert frame[frame.method == "random"].retained.max() < 0.5


@pytest.mark.slow
def test_an_identity_permutation_retains_exactly_every_unit(tiny_llava, scenes, llava_run):
    frame = invariance.region_invariance(
        tiny_llava, [s.image for s in scenes[:4]], llava_run.subset(range(4)), top_k=10,
        methods=["contribution", "gradient", "gradient_image", "random"],
        permutation=lambda index, n: np.arange(n))
    real = frame[frame.method != "random"]
    assert len(real) and (real.retained == 1.0).all()
    assert real.caption_same.all() and real.noun_kept.all() and (real.read_at == "shuffled").all()
    assert set(frame.n_nouns) == {len(g) for _, g in frame[frame.method == "random"].groupby("image")}


def test_a_reordered_noun_is_read_where_the_shuffled_caption_says_it(tiny_llava, scenes):
    """A permutation that mirrors the image left-right reorders a two-object caption; the
    units must then be read at the noun's new step, where they are the same units."""
    scene = next(s for s in make_scenes(40, seed=5) if len(s.nouns) == 2)
    mirror = lambda index, n: np.arange(n).reshape(8, 8)[:, ::-1].reshape(-1).copy()
    ident = find_neurons_by_method(tiny_llava, [scene.image], methods=["contribution"], top_k=10)
    frame = invariance.region_invariance(tiny_llava, [scene.image], ident, top_k=10,
                                         methods=["contribution"], permutation=mirror)
    kept = frame[frame.noun_kept]
    assert len(kept) and (kept.read_at == "shuffled").all()
    assert (frame[~frame.noun_kept].read_at == "original").all()


@pytest.mark.slow
def test_region_invariance_on_the_trained_model(tiny_llava, scenes, llava_run):
    frame = invariance.region_invariance(tiny_llava, [s.image for s in scenes[:4]],
                                         llava_run.subset(range(4)), top_k=10)
    with pytest.raises(ValueError, match="3 images for an identification of 4"):
        invariance.region_invariance(tiny_llava, [s.image for s in scenes[:3]], llava_run.subset(range(4)))
    assert frame.retained.between(0, 1).all()
    by_method = frame.groupby("method").retained.mean()
    assert by_method["random"] < by_method["contribution"]


# --- cross-image invariance -------------------------------------------------------
def _table(sets):
    """The identification of a hand-made table: one image per set (no captions needed)."""
    rows = [dict(image=i, noun=noun, method="contribution", rank=r, layer=l, unit=u)
            for i, (noun, units) in enumerate(sets) for r, (l, u) in enumerate(units)]
    return Identification(pd.DataFrame(rows), [None] * len(sets), [f"image-{i}" for i in range(len(sets))])


@pytest.mark.slow
def test_cross_image_invariance_known_answers():
    same = [(3, 1), (3, 2)]
    table = _table([("dog", same), ("dog", same), ("dog", same), ("cat", [(0, 5), (0, 6)]),
                    ("cat", [(0, 5), (1, 9)]), ("bee", [(2, 2), (2, 3)])])
    result = metrics.cross_image_invariance(table, k=2, nouns=["dog", "cat", "bee", "zebra"])
    result = result.set_index("noun")
    assert result.loc["dog", "jaccard_same"] == 1.0
    assert result.loc["dog", "jaccard_different"] == 0.0
    assert result.loc["dog", "top_unit_share"] == 1.0
    assert result.loc["cat", "jaccard_same"] == pytest.approx(1 / 3)
    assert result.loc["cat", "top_unit_share"] == 1.0
    assert result.loc["bee", "status"] == "only one image contains 'bee'; need at least 2"
    assert result.loc["zebra", "status"] == "no images contain 'zebra'"
    assert result.loc["zebra", "n_images"] == 0


@pytest.mark.slow
def test_cross_image_invariance_on_the_trained_model(tiny_llava):
    ident = find_neurons_by_method(tiny_llava, [s.image for s in make_scenes(24, seed=3)],
                                   methods=["contribution", "random"], top_k=10)
    result = metrics.cross_image_invariance(ident, k=10)
    ours = result[(result.status == "ok") & (result.method == "contribution")].jaccard_same.mean()
    chance = result[(result.status == "ok") & (result.method == "random")].jaccard_same.mean()
    assert ours > chance + 0.1                  # the same noun's images share units; random ones do not
    only = metrics.cross_image_invariance(ident, k=10, methods=["random"])
    pd.testing.assert_frame_equal(only, result[result.method == "random"].reset_index(drop=True))
    ok = result[result.status == "ok"]
    assert len(ok) and ok.jaccard_same.between(0, 1).all()


def test_depth_summary_compares_models_of_any_depth():
    import pandas as pd

    from mmneurons_utils.properties.metrics import depth_summary

    last = depth_summary(pd.Series([0.0] * 29 + [1.0]))
    assert last == dict(layers=30, upper_half=1.0, mean_depth=1.0)
    even = depth_summary(pd.Series([0.25] * 4))
    assert even["upper_half"] == 0.5 and even["mean_depth"] == (1 + 2 + 3 + 4) / 16
    odd = depth_summary(pd.Series([0.2] * 5))       # layers 3 and 4 of 5 (l ≥ L / 2), as the scorecard
    assert abs(odd["upper_half"] - 0.4) < 1e-12


# --- the identification is the input: nothing is identified or captioned again ---------------
def test_region_invariance_captions_only_the_shuffled_images(tiny_llava, scenes, llava_run, monkeypatch):
    calls = []
    original = tiny_llava.model.generate
    monkeypatch.setattr(tiny_llava.model, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    frame = invariance.region_invariance(tiny_llava, [s.image for s in scenes[:2]], llava_run.subset(range(2)),
                                         top_k=10, methods=["contribution", "random"])
    assert len(calls) == 2 and set(frame.image) <= {0, 1}     # one shuffled caption per image, no clean one


def test_polarity_report_reads_the_identification(tiny_llava, scenes, llava_run):
    images = [s.image for s in scenes]
    report = metrics.polarity_report(tiny_llava, images, llava_run, top_k=10)
    ours = llava_run.table[(llava_run.table.method == "contribution") & (llava_run.table["rank"] < 10)]
    assert report["units"] == len(ours)
    assert report["negative_coefficient"] == pytest.approx(float((ours.polarity < 0).mean()))
    # SwiGLU's coefficient has either sign; the official tensor act(gate) (SiLU) almost never
    assert report["negative_gate_only"] < 0.1 < report["negative_coefficient"]
    assert report["noun_hit_signed"] > report["noun_hit_unsigned"]      # half the units read backwards
    with pytest.raises(ValueError, match="top 20 units"):
        metrics.polarity_report(tiny_llava, images, llava_run, top_k=21)
    with pytest.raises(ValueError, match="11 images for an identification of 12"):
        metrics.polarity_report(tiny_llava, images[:11], llava_run)


def test_layer_distribution_of_an_identification(tiny_llava, llava_run):
    share = metrics.layer_distribution(llava_run, tiny_llava.n_layers)
    ours = llava_run.table[llava_run.table.method == "contribution"]
    assert list(share.index) == list(range(tiny_llava.n_layers)) and share.sum() == pytest.approx(1)
    assert share[3] == pytest.approx((ours.layer == 3).mean())
    top = metrics.layer_distribution(llava_run, tiny_llava.n_layers, k=5)
    assert top[3] == pytest.approx((ours[ours["rank"] < 5].layer == 3).mean())
    assert metrics.depth_summary(share)["upper_half"] > 0.5         # the paper's units sit in the upper layers


def test_the_invariance_panel_reads_the_identification(tiny_llava, scenes, llava_run, monkeypatch):
    from mmneurons_utils.widgets import InvariancePanel

    panel = InvariancePanel(tiny_llava, scenes[:3], llava_run, k=5)
    calls = []
    original = tiny_llava.model.generate
    monkeypatch.setattr(tiny_llava.model, "generate", lambda *a, **k: calls.append(1) or original(*a, **k))
    lines, table = panel.view()
    assert lines.splitlines()[0] == f"before shuffling: {llava_run.captions[0].text}"
    assert len(calls) == 2          # the shuffled caption shown and the one read: never the clean one
    assert set(table.index) == set(llava_run.captions[0].nouns)
    assert (table["retained (contribution)"] > table["retained (random)"]).all()
    panel.view()
    assert len(calls) == 2          # show() redraws the state view() made without running it again
    with pytest.raises(ValueError, match="holds 12 images for 13 scenes"):
        InvariancePanel(tiny_llava, make_scenes(13, seed=2), llava_run)
