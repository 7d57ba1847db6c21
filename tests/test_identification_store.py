"""One identification, computed once: save / load, the key that decides reuse, subset and units.

The notebooks share one :class:`Identification` through ``<output_dir>/identifications``; these
tests hold the promises that make that safe: a loaded identification equals the computed one bit
for bit, and anything that changes the numbers (a weight, a pixel, a setting) computes afresh.
"""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mmneurons_utils import make_scenes
from mmneurons_utils.method.identification import Identification
from mmneurons_utils.method.identify import ALL_METHODS, find_neurons_by_method, identify
from mmneurons_utils.store.identifications import ResultFileError

FAMILIES = ("tiny_llava", "tiny_instructblip")


@pytest.fixture(scope="module")
def images():
    return [s.image for s in make_scenes(n=4, seed=3)]


def assert_same(a: Identification, b: Identification) -> None:
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
    assert list(a.table.dtypes) == list(b.table.dtypes)
    assert a.image_keys == b.image_keys and a.settings == b.settings and a.identity == b.identity
    for x, y in zip(a.captions, b.captions, strict=True):
        assert (x.text, x.token_ids, x.tokens, x.nouns, x.noun_tokens) == \
               (y.text, y.token_ids, y.tokens, y.nouns, y.noun_tokens)
        assert torch.equal(x.activations.steps, y.activations.steps)
        assert (x.activations.image is None) == (y.activations.image is None)
        if x.activations.image is not None:
            assert torch.equal(x.activations.image, y.activations.image)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_identification_loads_bit_for_bit(family, images, tmp_path, request):
    vlm = request.getfixturevalue(family)
    ident = find_neurons_by_method(vlm, images, methods=ALL_METHODS, top_k=12, image_activations=True)
    assert ident.identity["weights"] and len(ident.identity["images"]) == len(images)
    loaded = Identification.load(ident.save(tmp_path / "one"))
    assert_same(ident, loaded)
    assert isinstance(loaded.table["top_tokens"].iloc[0], list)          # lists, as computed
    # what the rest of the package reads from it gives the same answers
    noun = ident.table["noun"].iloc[0]
    assert np.array_equal(ident.units(noun, 5), loaded.units(noun, 5))


def test_identify_reuses_only_what_has_the_same_weights_images_and_settings(tiny_llava, images, tmp_path):
    first = identify(tiny_llava, images, store=tmp_path, top_k=8, image_activations=True)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 1 and folders[0].startswith("tiny-llava-")
    # the same call loads: mark the saved table so that a load (and not a recomputation) shows
    folder = tmp_path / folders[0]
    marked = first.table.assign(score=first.table["score"] + 1000.0)
    marked.to_parquet(folder / "table.parquet", index=False)
    again = identify(tiny_llava, images, store=tmp_path, top_k=8, image_activations=True)
    assert (again.table["score"] > 500).all(), "the second call did not load the saved identification"
    first.save(folder, key=json.loads((folder / "identification.json").read_text())["key"])

    # another setting, another image, other weights: a new key, computed afresh
    identify(tiny_llava, images, store=tmp_path, top_k=9, image_activations=True)
    identify(tiny_llava, images[::-1], store=tmp_path, top_k=8, image_activations=True)
    column = tiny_llava.down_proj(0).weight
    saved = column.detach().clone()
    try:
        with torch.no_grad():
            column[0, 0] += 1.0
        edited = identify(tiny_llava, images, store=tmp_path, top_k=8, image_activations=True)
    finally:
        with torch.no_grad():
            column.copy_(saved)
    assert edited.identity["weights"] != first.identity["weights"]
    assert len(list(tmp_path.iterdir())) == 4
    assert_same(first, identify(tiny_llava, images, store=tmp_path, top_k=8, image_activations=True))


def test_a_killed_or_damaged_save_is_computed_again(tiny_llava, images, tmp_path):
    first = identify(tiny_llava, images, store=tmp_path, top_k=6)
    folder = next(tmp_path.iterdir())
    (folder / "activations.safetensors").write_bytes(b"not a tensor file")
    assert_same(first, identify(tiny_llava, images, store=tmp_path, top_k=6))   # damaged → recomputed
    (folder / "identification.json").unlink()                                  # killed before the sidecar
    with pytest.raises(ResultFileError, match="holds no saved identification"):
        Identification.load(folder)
    assert_same(first, identify(tiny_llava, images, store=tmp_path, top_k=6))
    assert (folder / "identification.json").exists()


def test_subset_keeps_the_rows_of_the_images_it_names(tiny_llava, images):
    ident = find_neurons_by_method(tiny_llava, images, methods=("contribution", "random"), top_k=5,
                                   image_keys=[f"k{i}" for i in range(len(images))])
    part = ident.subset([2, "k0"])
    assert part.image_keys == ["k2", "k0"] and part.texts == [ident.texts[2], ident.texts[0]]
    assert part.identity["images"] == [ident.identity["images"][2], ident.identity["images"][0]]
    for new, old in ((0, 2), (1, 0)):
        mine = part.table[part.table.image == new].drop(columns="image").reset_index(drop=True)
        theirs = ident.table[ident.table.image == old].drop(columns="image").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, theirs)
    noun = part.captions[0].nouns[0]
    assert np.array_equal(part.units(noun, 3, image=0), ident.units(noun, 3, image=2))
    with pytest.raises(ValueError, match="no image 'k9'"):
        ident.subset(["k9"])
    with pytest.raises(ValueError, match="position 0–3"):
        ident.subset([4])


def test_specificity_takes_the_identification_and_designs_earlier_call_form(tiny_llava):
    from mmneurons_utils import metrics

    scenes = make_scenes(n=4, seed=3)
    ident = find_neurons_by_method(tiny_llava, [s.image for s in scenes], methods=("contribution", "random"),
                                   top_k=10, image_activations=True)
    table, captions = ident
    new = metrics.specificity_scores(tiny_llava, scenes, ident, k=10)
    old = metrics.specificity_scores(tiny_llava, scenes, captions, table, 10)    # DESIGN.md's form
    pd.testing.assert_frame_equal(new, old)
    assert new["mass_in_box"].notna().any()
