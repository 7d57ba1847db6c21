"""The model report (``mmneurons report``): the numbers must carry
the science (ours above chance, chance where it should be), not only exist."""

import json

import pytest

from mmneurons_utils import make_scenes
from mmneurons_utils.batch.model_report import report


def test_report_puts_the_contribution_units_above_random(tiny_llava):
    r = report(tiny_llava, n_scenes=12, n_region=3, n_ablate=3)
    assert r["vocabulary"] == 75 and r["units"] == 4 * 768
    assert r["noun_hit"]["contribution"] > 2 * r["noun_hit"]["random"]
    assert r["noun_rank"]["contribution"] < r["noun_rank"]["random"]
    assert r["auroc"]["contribution"] > 0.6 and abs(r["auroc"]["random"] - 0.5) < 0.15
    assert r["jaccard_same"]["contribution"] > 5 * r["jaccard_different"]["contribution"]
    # the text twin counts only prompts whose greedy answer is the noun: few on a model never trained
    # on text alone, so it is compared only where some noun has one
    if r["text_twin_nouns"]:
        assert r["text_twin_retained"] >= r["text_twin_random"]
    assert 0 < r["negative_share"] < 1 and 0 <= r["upper_half_share"] <= 1
    assert abs(sum(r["layer_shares"].values()) - 1) < 1e-3
    # the nulls, the ceiling, the maps that can see a local response, both scores (issue 26)
    assert r["nulls"]["hit_random"] < r["nulls"]["hit_selection_null"] < r["noun_hit"]["contribution"]
    assert r["ceiling"]["nouns_with_a_naming_unit"] <= r["ceiling"]["nouns"]
    assert r["ceiling"]["hit_where_nameable"] >= r["noun_hit"]["contribution"] - 1e-9
    spec = r["specificity"]
    assert spec["occlusion_mass_in_box"] > spec["box_share"] and spec["mass_in_box_centred"] > spec["box_share"]
    assert spec["mass_in_box_centred"] > spec["mass_in_box_centred_random"]
    assert set(r["methods"]) == {"contribution", "noun_contrast"}
    assert {"hit", "median_rank", "generic_share", "removed_k50"} <= set(r["methods"]["noun_contrast"])
    assert set(r["lens"]) == {"raw", "rms", "norm"}


def test_report_command_prints_json(cli):
    code, out, _ = cli("report", "--model", "tiny-llava", "--scenes", "4", "--region", "1", "--ablate", "1",
                       "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["model"] == "tiny-llava" and result["n_scenes"] == 4
    assert result["region_scenes"] == 1 and result["ablate_scenes"] == 1
    assert {"nulls", "ceiling", "specificity", "methods"} <= set(result)


def test_report_of_a_model_without_patch_grid_has_no_box_numbers(tiny_instructblip):
    r = report(tiny_instructblip, n_scenes=6, n_region=1, n_ablate=1)
    assert set(r["mass_in_box"].values()) == {None} and "selection_null" in r["mass_in_box"]
    assert r["specificity"]["occlusion_mass_in_box"] is None
    assert r["auroc"]["contribution"] is not None


@pytest.mark.slow
def test_report_reads_one_identification(tiny_llava, monkeypatch):
    """Given the scenes' identification it identifies nothing and gives the numbers it gives alone."""
    from mmneurons_utils.batch import model_report
    from mmneurons_utils.method.identify import find_neurons_by_method

    images = [s.image for s in make_scenes(6, seed=0)]
    ident = find_neurons_by_method(tiny_llava, images, methods=model_report.METHODS, top_k=50, seed=0,
                                   image_activations=True)
    fresh = report(tiny_llava, n_scenes=6, n_region=2, n_ablate=2)
    monkeypatch.setattr(model_report, "identify", lambda *a, **k: pytest.fail("identified again"))
    given = report(tiny_llava, n_scenes=6, n_region=2, n_ablate=2, ident=ident)
    fresh.pop("seconds"), given.pop("seconds")
    assert given == fresh
    with pytest.raises(ValueError, match="needs the 5 scenes"):
        report(tiny_llava, n_scenes=5, ident=ident)
