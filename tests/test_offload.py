"""A model larger than the device: with every decoder layer and the unembedding offloaded to
disk (accelerate device map, tiny ``max_memory``), identification, perturbation, editing and
the vocabulary give the fully loaded model's results, and undo restores the weights exactly."""

import numpy as np
import pandas as pd
import pytest
import torch

from mmneurons_utils import find_neurons, load_vlm, make_scenes
from mmneurons_utils.interventions.editing import edit_token
from mmneurons_utils.method.identification import units_of
from mmneurons_utils.interventions.ablation import ablate_activations, perturb_units
from mmneurons_utils.model.offload import offloaded, weight
from mmneurons_utils.model.teacher_forcing import teacher_forced_logits
from mmneurons_utils.model.vlm import ModelLoadError

pytestmark = pytest.mark.slow   # the slow tier: every test here takes seconds to minutes

pytest.importorskip("accelerate")


def _pair(name, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"offload-{name}")
    mapped = load_vlm(name, device_map="auto", max_memory={"cpu": "6MB"}, offload_folder=folder)
    return load_vlm(name), mapped


@pytest.fixture(scope="module", params=["tiny-llava", "tiny-instructblip"])
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory):
    return _pair("tiny-llava", tmp_path_factory)


@pytest.fixture(scope="module")
def images():
    return [s.image for s in make_scenes(4, seed=2)]


def _w_out(vlm):
    return [weight(vlm.down_proj(l)).clone() for l in range(vlm.n_layers)]


def test_the_layers_really_are_offloaded(pair):
    full, mapped = pair
    assert all(offloaded(mapped.down_proj(l)) for l in range(mapped.n_layers))
    assert offloaded(mapped.lm_head) and mapped.down_proj(0).weight.device.type == "meta"
    assert not offloaded(full.down_proj(0))


@pytest.mark.parametrize("method", ["contribution", "gradient", "gradient_image", "random"])
def test_find_neurons_equals_the_loaded_model(pair, images, method):
    full, mapped = pair
    a = find_neurons(full, images, method=method, top_k=10)
    b = find_neurons(mapped, images, method=method, top_k=10)
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)


def test_perturbation_reaches_the_offloaded_weights_and_undo_is_exact(llava_pair, images):
    full, mapped = llava_pair
    table = find_neurons(full, images[:1], top_k=50)
    units = units_of(table, table.noun.iloc[0], 50, image=0)
    ids = [c.token_ids for c in full.describe(images[:1])]
    before = _w_out(mapped)
    clean = teacher_forced_logits(mapped, images[:1], ids)[0]
    for kwargs in (dict(mode="zero"), dict(mode="noise", sigma=2.0, seed=3)):
        with perturb_units(full, units, **kwargs):
            expected = teacher_forced_logits(full, images[:1], ids)[0]
        with perturb_units(mapped, units, **kwargs):
            got = teacher_forced_logits(mapped, images[:1], ids)[0]
        assert not torch.allclose(got, clean, atol=1e-3)            # the change was used
        assert torch.allclose(got, expected, atol=1e-4)
        assert all(torch.equal(w, b) for w, b in zip(_w_out(mapped), before))   # bit-for-bit
    assert torch.equal(teacher_forced_logits(mapped, images[:1], ids)[0], clean)
    with ablate_activations(mapped, units):                          # hooks on offloaded layers
        assert not torch.allclose(teacher_forced_logits(mapped, images[:1], ids)[0], clean, atol=1e-3)


def test_an_edit_of_offloaded_layers_matches_and_undoes_exactly(llava_pair, images):
    full, mapped = llava_pair
    caption = full.describe(images[:1])[0]
    source, target = caption.nouns[0], "cat" if caption.nouns[0] != "cat" else "dog"
    before = _w_out(mapped)
    a = edit_token(full, images[:1], source, target, k=5, steps=40)
    b = edit_token(mapped, images[:1], source, target, k=5, steps=40)
    assert np.array_equal(a.units, b.units) and a.converged == b.converged
    assert torch.allclose(a.deltas, b.deltas, atol=1e-4)
    assert a.captions_after == b.captions_after and b.applied
    assert not all(torch.equal(w, o) for w, o in zip(_w_out(mapped), before))  # in the store
    a.undo(), b.undo()
    assert all(torch.equal(w, o) for w, o in zip(_w_out(mapped), before))
    assert mapped.describe(images[:1])[0].text == caption.text


def test_the_lens_and_the_weights_hash_read_the_offloaded_weights(llava_pair):
    from mmneurons_utils.method.scoring import unit_logit_lens
    from mmneurons_utils.model.cache import weights_hash

    full, mapped = llava_pair
    assert weights_hash(full) == weights_hash(mapped)
    units = np.array([[l, u] for l in range(full.n_layers) for u in (0, 17, 700)])
    signs = np.resize([1, -1], len(units))
    assert unit_logit_lens(full, units, 5, signs)[0] == unit_logit_lens(mapped, units, 5, signs)[0]


def test_bad_device_maps_are_clear_errors():
    with pytest.raises(ModelLoadError, match="device_map must be one of"):
        load_vlm("tiny-llava", device_map="everywhere")
    with pytest.raises(ModelLoadError, match="need a device_map"):
        load_vlm("tiny-llava", max_memory={"cpu": "1GB"})


def test_bench_times_the_offloaded_model(llava_pair, images):
    from mmneurons_utils.batch.bench import time_offload

    full, _ = llava_pair
    out = time_offload(full, images[:2], repeats=1)
    assert out["offload_slowdown"] > 0 and out["offload_s"] > 0
