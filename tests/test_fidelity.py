"""Tests that can fail on the science: the paper's neurons, read in their polarity, must
name their noun, fire inside its box and select the images that contain it — far more
than random units do. Held-out scenes (seeds < 10,000), fixed seeds, the embedded models.

The thresholds are the fidelity issue's: measured 0.90 / 0.73 noun hits (random 0.15),
mass in box 0.37 (box share 0.20, random 0.25), AUROC 0.80 (random 0.52) on 64 scenes.
"""

import numpy as np
import pandas as pd
import pytest

from mmneurons_utils import make_scenes, metrics
from mmneurons_utils.method.identification import Identification
from mmneurons_utils.method.identify import find_neurons_by_method
from mmneurons_utils.method.scoring import unit_logit_lens
from mmneurons_utils.properties.sensitivity import noun_hits

pytestmark = pytest.mark.slow   # the slow tier: every test here takes seconds to minutes

N_SCENES = 48


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(N_SCENES, seed=0)


@pytest.fixture(scope="module")
def llava_run(tiny_llava, scenes):
    return find_neurons_by_method(tiny_llava, [s.image for s in scenes], top_k=10,
                                  methods=("contribution", "random"), image_activations=True)


@pytest.fixture(scope="module")
def instructblip_run(tiny_instructblip, scenes):
    return find_neurons_by_method(tiny_instructblip, [s.image for s in scenes], top_k=10,
                                  methods=("contribution", "random"), image_activations=True)


@pytest.mark.parametrize("run, name, floor", [("llava_run", "tiny_llava", 0.80),
                                               ("instructblip_run", "tiny_instructblip", 0.65)])
def test_contribution_units_name_their_noun(run, name, floor, request):
    ident = request.getfixturevalue(run)
    table = ident.table
    vlm = request.getfixturevalue(name)
    hits = noun_hits(ident, k=10).groupby("method").noun_hit.mean()
    assert hits["contribution"] >= floor
    assert hits["random"] <= 0.30
    # about half of the top units write the noun through −W_out: without the sign, the
    # noun sits at the bottom of their lens and the hit rate collapses
    ours = table[table.method == "contribution"]
    assert 0.2 <= (ours.polarity < 0).mean() <= 0.8
    _, unsigned_ranks = unit_logit_lens(vlm, ours[["layer", "unit"]].to_numpy(), 10,
                                        token_ids=ours.token_id.to_numpy())
    assert (ours.noun_rank < 10).mean() > (unsigned_ranks < 10).mean() + 0.2


def test_signed_maps_put_their_mass_in_the_box(tiny_llava, scenes, llava_run):
    scores = metrics.specificity_scores(tiny_llava, scenes, llava_run, k=10)
    means = scores[scores.in_scene].groupby("method")[["mass_in_box", "box_share"]].mean()
    ours, chance = means.loc["contribution", "mass_in_box"], means.loc["contribution", "box_share"]
    assert ours >= 1.5 * chance
    assert ours >= means.loc["random", "mass_in_box"] + 0.05


@pytest.mark.parametrize("run, name", [("llava_run", "tiny_llava"),
                                       ("instructblip_run", "tiny_instructblip")])
def test_contribution_units_select_the_images_with_their_noun(run, name, scenes, request):
    ident = request.getfixturevalue(run)
    vlm = request.getfixturevalue(name)
    auroc = metrics.specificity_scores(vlm, scenes, ident, k=10).groupby("method").auroc.mean()
    assert auroc["contribution"] >= 0.75
    assert auroc["random"] <= 0.60


def test_word_markers_of_real_tokenizers_are_stripped():
    rows = [dict(image=0, noun="dog", method="m", rank=r, top_tokens=tokens)
            for r, tokens in enumerate([["▁dog", "▁cat"], ["Ġdog", "x"], ["▁Dog"], ["▁do", "##g"]])]
    ident = Identification(pd.DataFrame(rows), [None], ["image-0"])   # a hand-made table: no captions
    assert noun_hits(ident, k=4).noun_hit.item() == 0.75
    assert np.isnan(noun_hits(ident, k=4).noun_rank.item())     # no noun_rank column: no rank
