"""Reversible interventions restore the weights bit-for-bit; activation hooks hit only
the chosen positions; the causal curves separate identified from random units."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmneurons_utils import make_scenes
from mmneurons_utils.interventions.causal import causal_curves, half_removal_k, summarize
from mmneurons_utils.method.identify import find_neurons_by_method
from mmneurons_utils.model.teacher_forcing import teacher_forced_logits
from mmneurons_utils.interventions.ablation import ablate_activations, perturb_units




@pytest.fixture(scope="module")
def images():
    return [s.image for s in make_scenes(3, seed=5)]


def _weights(vlm):
    return [vlm.down_proj(layer).weight.detach().clone() for layer in range(vlm.n_layers)]


def _assert_restored(vlm, before):
    for layer, w in enumerate(before):
        assert torch.equal(vlm.down_proj(layer).weight, w), f"layer {layer} not restored"


unit_sets = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 767)), min_size=1, max_size=40)
modes = st.sampled_from([dict(mode="noise", sigma=1.0), dict(mode="noise", sigma=0.3, relative=False),
                         dict(mode="zero"), dict(mode="scale", factor=-2.5)])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(units=unit_sets, kwargs=modes, seed=st.integers(0, 2**31), repeat=st.booleans())
def test_perturbation_is_restored_bit_for_bit(random_vlm, units, kwargs, seed, repeat):
    vlm = random_vlm
    units = units + units[: len(units) // 2 + 1] if repeat else units  # the same unit twice
    before = _weights(vlm)
    touched = {(l, u) for l, u in units}
    with perturb_units(vlm, np.array(units), seed=seed, **kwargs):
        for layer in range(vlm.n_layers):
            w = vlm.down_proj(layer).weight
            cols = sorted(u for l, u in touched if l == layer)
            other = np.setdiff1d(np.arange(vlm.d_ff), cols)
            assert torch.equal(w[:, other], before[layer][:, other])  # nothing else moves
            for u in cols:
                assert not torch.equal(w[:, u], before[layer][:, u])
    _assert_restored(vlm, before)


@pytest.mark.parametrize("kwargs", [dict(mode="noise"), dict(mode="zero"), dict(mode="scale", factor=3.0)])
def test_restored_when_the_block_raises(random_vlm, images, kwargs):
    before = _weights(random_vlm)
    with pytest.raises(RuntimeError, match="boom"):
        with perturb_units(random_vlm, [(3, 1), (0, 2), (3, 1)], **kwargs):
            random_vlm.describe(images[:1], max_new_tokens=2)
            raise RuntimeError("boom")
    _assert_restored(random_vlm, before)


def test_repeated_unit_is_perturbed_once(random_vlm):
    w = random_vlm.down_proj(2).weight
    original = w[:, 7].clone()
    with perturb_units(random_vlm, [(2, 7), (2, 7), (2, 7)], mode="scale", factor=2.0):
        torch.testing.assert_close(w[:, 7], 2 * original, rtol=0, atol=0)
    assert torch.equal(w[:, 7], original)


def test_noise_is_seeded_and_relative_to_the_column(random_vlm):
    units = [(l, u) for l in range(4) for u in range(0, 768, 8)]  # 384 columns
    w = random_vlm.down_proj(1).weight
    cols = torch.arange(0, 768, 8)
    clean = w[:, cols].detach().clone()
    with perturb_units(random_vlm, units, sigma=0.5, seed=3):
        first = w[:, cols].detach().clone()
    with perturb_units(random_vlm, units, sigma=0.5, seed=3):
        assert torch.equal(w[:, cols], first)
    with perturb_units(random_vlm, units, sigma=0.5, seed=4):
        assert not torch.equal(w[:, cols], first)
    ratio = ((first - clean).pow(2).mean(0).sqrt() / clean.pow(2).mean(0).sqrt())  # per column
    assert 0.4 < float(ratio.median()) < 0.6


def test_bad_units_and_modes_are_value_errors(random_vlm):
    with pytest.raises(ValueError, match="layers 0 … 3"):
        with perturb_units(random_vlm, [(4, 0)]):
            pass
    with pytest.raises(ValueError, match="units 0 … 767"):
        with perturb_units(random_vlm, [(0, 768)]):
            pass
    with pytest.raises(ValueError, match="noise, zero, scale"):
        with perturb_units(random_vlm, [(0, 1)], mode="blur"):
            pass


def test_activation_zero_everywhere_equals_zeroing_the_columns(random_vlm, images):
    vlm = random_vlm
    caps = vlm.describe(images, max_new_tokens=6)
    ids = [c.token_ids for c in caps]
    units = [(3, 5), (3, 9), (1, 100), (0, 3)]
    with perturb_units(vlm, units, mode="zero"):
        by_weights = teacher_forced_logits(vlm, images, ids)
    with ablate_activations(vlm, units):
        by_hook = teacher_forced_logits(vlm, images, ids)
    for a, b in zip(by_weights, by_hook):
        torch.testing.assert_close(a, b)
    assert all(not vlm.down_proj(l)._forward_pre_hooks for l in range(vlm.n_layers))


def test_activation_ablation_only_at_the_chosen_position(random_vlm, images):
    vlm = random_vlm
    caps = vlm.describe(images[:1], max_new_tokens=6)
    ids = [caps[0].token_ids]
    prompt_len = vlm.inputs(images[:1])["input_ids"].shape[1]
    clean = teacher_forced_logits(vlm, images[:1], ids)[0]
    units = [(l, u) for l in range(4) for u in range(0, 768, 2)]  # half of all units: a big effect
    step = 3
    with ablate_activations(vlm, units, positions=[prompt_len - 1 + step]):
        hit = teacher_forced_logits(vlm, images[:1], ids)[0]
        cached = vlm.describe(images[:1], max_new_tokens=6)[0].token_ids
        uncached = vlm.describe(images[:1], max_new_tokens=6, use_cache=False)[0].token_ids
    torch.testing.assert_close(hit[:step], clean[:step], rtol=0, atol=0)  # earlier steps untouched
    assert not torch.allclose(hit[step], clean[step])
    assert cached == uncached  # the same absolute position with and without the KV cache
    assert cached[:step] == caps[0].token_ids[:step]


def test_teacher_forcing_reproduces_the_greedy_caption(tiny_llava):
    images = [s.image for s in make_scenes(6, seed=21)]
    caps = tiny_llava.describe(images)
    logits = teacher_forced_logits(tiny_llava, images, [c.token_ids for c in caps])
    for lg, cap in zip(logits, caps):
        assert lg.argmax(-1).tolist() == cap.token_ids


@pytest.mark.slow
def test_identified_units_matter_more_than_random_ones(tiny_llava):
    """The paper's causal property on the trained model: zeroing the top-50 contribution
    units lowers the noun's margin far more than zeroing 50 random units (two draws)."""
    images = [s.image for s in make_scenes(6, seed=0)]
    before = _weights(tiny_llava)
    ident = find_neurons_by_method(tiny_llava, images, methods=("contribution",), top_k=50)
    curves = causal_curves(tiny_llava, ident, images, ks=(50,), methods=("contribution", "random"),
                           n_random=2, seed=0, rerank=True)
    _assert_restored(tiny_llava, before)
    assert set(curves.method) == {"contribution", "random"} and curves.noun.notna().all()
    s = summarize(curves).set_index("method")
    assert s.loc["contribution", "margin_drop"] > 1.0
    assert s.loc["contribution", "margin_drop"] > 5 * abs(s.loc["random", "margin_drop"])
    assert s.loc["random", "noun_removed"] == 0.0
    half = half_removal_k(curves).set_index("method")
    assert not half.loc["random", "reached"] and np.isnan(half.loc["random", "k_half"])


@pytest.mark.parametrize("kwargs", [dict(mode="noise"), dict(mode="zero"), dict(mode="scale", factor=2.0)])
def test_perturbation_keeps_the_callers_grad_mode(random_vlm, images, kwargs):
    """The weight writes run under ``no_grad``; the caller's block runs in its own grad mode
    (gradient scores under a perturbation need it)."""
    vlm = random_vlm
    before = _weights(vlm)
    enc = vlm.inputs(images[:1])
    assert torch.is_grad_enabled()
    with perturb_units(vlm, [(3, 1), (0, 2)], **kwargs):
        assert torch.is_grad_enabled()
        loss = vlm.model(**enc).logits[0, -1].logsumexp(-1)
        loss.backward()
        assert vlm.down_proj(3).weight.grad is not None
    vlm.model.zero_grad(set_to_none=True)
    _assert_restored(vlm, before)
    with torch.no_grad(), perturb_units(vlm, [(3, 1)], **kwargs):
        assert not torch.is_grad_enabled()
