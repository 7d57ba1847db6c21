"""Specificity that sees a local response: median-centred maps, occlusion-difference maps and
occlusion locality per stage, on hand-made maps with known answers and on the tiny models."""

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image
import pytest

from mmneurons_utils import make_scenes, plots
from mmneurons_utils.data.datasets import Sample
from mmneurons_utils.method.identification import Identification
from mmneurons_utils.method.identify import find_neurons_by_method
from mmneurons_utils.properties import occlusion, specificity
from mmneurons_utils.properties.locality import occlusion_locality
from mmneurons_utils.tiny.scenes import BACKGROUNDS

matplotlib.use("Agg")

SIZE = (64, 64)
BOX = (16, 16, 32, 32)           # patches (2, 2) … (3, 3) of an 8 × 8 grid: 4 of 64


def bump_map(offset: float, bump: float = 1.0) -> np.ndarray:
    grid = np.full((8, 8), offset)
    grid[2:4, 2:4] += bump
    return grid


# --- hand-made maps ---------------------------------------------------------------
def test_a_flat_offset_hides_the_bump_from_raw_mass_but_not_from_the_centred_map():
    grid = bump_map(offset=10.0)
    chance = specificity.box_share(SIZE, [BOX])
    assert chance == pytest.approx(4 / 64)
    raw = specificity.mass_in_box(grid, SIZE, [BOX])
    assert raw == pytest.approx(chance, abs=0.01)            # the offset's mass swamps the bump
    centred = specificity.centred(grid[None])[0]
    assert np.median(centred) == 0
    assert specificity.mass_in_box(centred, SIZE, [BOX]) == pytest.approx(1.0)
    # without an offset the two readings agree
    assert specificity.mass_in_box(bump_map(0.0), SIZE, [BOX]) == pytest.approx(1.0)


def test_a_map_flat_everywhere_has_no_centred_mass():
    """Decision: a map equal on every patch has nothing local to measure, so its centred mass
    in box is NaN (summaries skip it), not the chance level."""
    centred = specificity.centred(np.full((1, 8, 8), 3.5))[0]
    assert not centred.any()
    assert np.isnan(specificity.mass_in_box(centred, SIZE, [BOX]))


def test_centring_each_unit_only_shifts_the_mean_map_so_pointing_is_unchanged():
    maps = np.random.default_rng(0).normal(size=(10, 8, 8)) + np.arange(10)[:, None, None]
    shift = specificity.centred(maps).mean(0) - maps.mean(0)
    np.testing.assert_allclose(shift, shift.flat[0])           # one constant on every patch
    for box in [BOX, (0, 0, 24, 24), (40, 8, 64, 40)]:
        assert specificity.pointing_hit(specificity.centred(maps).mean(0), SIZE, [box]) == \
            specificity.pointing_hit(maps.mean(0), SIZE, [box])


def test_signed_share_is_positive_for_a_bump_and_near_zero_for_cancelling_signs():
    assert specificity.signed_share_in_box(bump_map(0.0), SIZE, [BOX]) == pytest.approx(1.0)
    assert specificity.signed_share_in_box(-bump_map(0.0), SIZE, [BOX]) == pytest.approx(-1.0)
    # units of random polarity whose change is all in the box: positive mass in box is 1 for
    # most draws, the signed share averages out near 0
    rng = np.random.default_rng(1)
    signed, positive = [], []
    for _ in range(200):
        units = rng.choice([-1, 1], size=(10, 1, 1)) * rng.uniform(0.5, 1.5, (10, 1, 1)) * bump_map(0.0)
        mean = units.mean(0)
        signed.append(specificity.signed_share_in_box(mean, SIZE, [BOX]))
        positive.append(specificity.mass_in_box(mean, SIZE, [BOX]))
    assert abs(np.mean(signed)) < 0.1
    assert np.nanmean(positive) == pytest.approx(1.0)
    assert np.isnan(specificity.signed_share_in_box(np.zeros((8, 8)), SIZE, [BOX]))


# --- painting ----------------------------------------------------------------------------
def test_occlusion_paints_the_box_with_the_scene_background_and_nothing_else():
    scene = make_scenes(3, seed=5)[2]
    assert occlusion.fill_colour(scene) == BACKGROUNDS[scene.background]
    noun, (x0, y0, x1, y1) = scene.boxes[0]
    painted = np.asarray(occlusion.occlude(scene, [(x0, y0, x1, y1)]))
    before = np.asarray(scene.image)
    assert (painted[y0:y1, x0:x1] == BACKGROUNDS[scene.background]).all()
    outside = np.ones(before.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert (painted[outside] == before[outside]).all()
    assert (before[y0:y1, x0:x1] != BACKGROUNDS[scene.background]).any(axis=-1).any()   # a glyph was there


def test_a_flat_background_is_found_in_a_folder_too_and_a_photo_is_painted_with_its_mean():
    scene = make_scenes(1, seed=5)[0]
    exported = Sample(image=scene.image, name="own.png", nouns=scene.nouns, boxes=scene.boxes)
    assert occlusion.fill_colour(exported) == BACKGROUNDS[scene.background]   # same numbers as the scene
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)   # no flat background
    photo = Sample(image=Image.fromarray(noise), name="photo.png", nouns=["dog"], boxes=[("dog", (8, 8, 24, 24))])
    assert occlusion.fill_colour(photo) == tuple(int(round(c)) for c in noise.reshape(-1, 3).mean(0))


# --- the tiny models -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes():
    return make_scenes(16, seed=0)


@pytest.fixture(scope="module")
def run(tiny_llava, scenes):
    return find_neurons_by_method(tiny_llava, [s.image for s in scenes], methods=("contribution", "random"),
                                  top_k=10, image_activations=True, seed=0)


@pytest.fixture(scope="module")
def scores(tiny_llava, scenes, run):
    return specificity.specificity_scores(tiny_llava, scenes, run, k=10, occlusion=True, batch_size=8)


def test_the_prefill_reads_what_describe_records(tiny_llava, scenes, run):
    _, captions = run
    for index, image in occlusion.prefill_image_activations(tiny_llava, [s.image for s in scenes[:3]],
                                                            batch_size=2):
        np.testing.assert_allclose(image.numpy(), captions[index].activations.image.numpy(),
                                   rtol=1e-5, atol=1e-5)


def test_occlusion_maps_are_the_activation_change_of_the_painted_image(tiny_llava, scenes, run):
    """Independent check of one (image, noun): describe the painted image, subtract by hand."""
    table, captions = run
    row = table[(table.method == "contribution") & (table["rank"] == 0) & table.apply(
        lambda r: bool(specificity.objects.boxes_for(scenes[int(r.image)], r.noun)), axis=1)].iloc[0]
    image, noun, unit = int(row.image), row.noun, (int(row.layer), int(row.unit))
    painted = occlusion.occlude(scenes[image], specificity.objects.boxes_for(scenes[image], noun))
    after = tiny_llava.describe([painted], max_new_tokens=1, activation="down_proj_input",
                                image_activations=True)[0].activations.image[unit[0], :, unit[1]]
    expected = (captions[image].activations.image[unit[0], :, unit[1]] - after).numpy()
    got = occlusion.occlusion_deltas(tiny_llava, scenes, run, {(image, noun): [unit]})[(image, noun)][0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_the_old_columns_stay_and_the_new_ones_are_there(scores, tiny_llava, scenes, run):
    inside = scores[scores.in_scene]
    for column in ("mass_in_box", "box_share", "pointing_hit", "auroc", "mass_in_box_centred",
                   "pointing_hit_centred", "occlusion_mass_in_box", "occlusion_pointing_hit",
                   "occlusion_signed_in_box"):
        assert column in scores, column
    assert inside[["mass_in_box_centred", "occlusion_mass_in_box"]].stack().between(0, 1).all()
    assert (inside.pointing_hit_centred == inside.pointing_hit).all()     # a constant shift
    table, captions = run
    plain = specificity.specificity_scores(tiny_llava, scenes, run, k=10)
    assert not any(c.startswith("occlusion_") for c in plain)              # default: no extra cost
    np.testing.assert_allclose(plain.mass_in_box, scores.mass_in_box)


def test_contribution_units_respond_to_their_object_inside_its_box(scores):
    means = scores[scores.in_scene].groupby("method")[
        ["mass_in_box_centred", "occlusion_mass_in_box", "occlusion_signed_in_box", "box_share"]].mean()
    ours, random = means.loc["contribution"], means.loc["random"]
    assert ours.occlusion_mass_in_box > ours.box_share + 0.1
    assert ours.occlusion_mass_in_box > random.occlusion_mass_in_box
    assert ours.mass_in_box_centred > ours.box_share + 0.1
    # painting out the object lowers our units (in their polarity) inside its box; random
    # units of either polarity cancel
    assert ours.occlusion_signed_in_box > random.occlusion_signed_in_box + 0.1
    assert abs(random.occlusion_signed_in_box) < 0.15


def test_occlusion_changes_the_model_inside_the_box_at_every_stage(tiny_llava, scenes):
    locality = occlusion_locality(tiny_llava, scenes[:8], max_objects=10)
    assert len(locality.drop_duplicates(["image", "noun"])) == 10
    n = tiny_llava.n_layers
    stages = locality.drop_duplicates("stage").sort_values("stage_index").stage.tolist()
    assert stages == ["vision tower", "projector"] + [f"LM layer {l}" for l in sorted({0, n // 2, n - 1})]
    means = locality.groupby("stage")[["share_in_box", "box_share", "max_in_box"]].mean()
    assert means.loc["vision tower", "share_in_box"] > 2 * means.loc["vision tower", "box_share"]
    assert means.loc["vision tower", "max_in_box"] >= 0.8
    assert (locality.change > 0).all()
    with pytest.raises(ValueError, match="layers must lie"):
        occlusion_locality(tiny_llava, scenes[:1], layers=[n])


def test_the_locality_figure_is_labelled(tiny_llava, scenes):
    locality = occlusion_locality(tiny_llava, scenes[:2], max_objects=3, layers=[0])
    fig = plots.occlusion_locality_plot(locality.assign(model="tiny-llava"))
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    assert ax.get_legend() is not None
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "vision\ntower"


def test_query_token_models_get_a_clear_error_for_maps_and_auroc_still_works(tiny_instructblip, scenes):
    with pytest.raises(ValueError, match="not a patch grid"):
        occlusion_locality(tiny_instructblip, scenes[:2])
    ident = find_neurons_by_method(tiny_instructblip, [s.image for s in scenes[:6]],
                                   methods=["contribution"], top_k=5, image_activations=True)
    spec = specificity.specificity_scores(tiny_instructblip, scenes[:6], ident, k=5, occlusion=True)
    assert "auroc" in spec and not any("mass_in_box" in c or "occlusion" in c for c in spec)


def test_occlusion_needs_the_image_activations(tiny_llava, scenes):
    caption = tiny_llava.describe([scenes[0].image], activation="down_proj_input")[0]
    noun = scenes[0].boxes[0][0]
    with pytest.raises(ValueError, match="image_activations=True"):
        occlusion.occlusion_deltas(tiny_llava, scenes[:1], Identification(pd.DataFrame(), [caption], ["image-0"]),
                                   {(0, noun): [[0, 0]]})
