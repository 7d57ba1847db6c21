"""Correctness evidence for activation capture and the unit scores.

Random-weight tiny models (the real transformers classes) are used where any
weights will do; the trained embedded model where nouns must be said.
"""

import numpy as np
import pytest
import torch

from mmneurons_utils import find_neurons, make_scenes
from mmneurons_utils.method.identify import NounNotInCaption
from mmneurons_utils.method.scoring import contribution_scores, gradient_attributions, unit_logit_weights
from mmneurons_utils.tiny.build import build_tiny_instructblip, build_tiny_llava
from mmneurons_utils.model.vlm import VLM


RANDOM_VLM_FAMILIES = ("tiny-llava", "tiny-instructblip")   # the random_vlm fixture (conftest)


@pytest.fixture(scope="module")
def images():
    return [s.image for s in make_scenes(3, seed=11)]


def _record_mlp_outputs(vlm):
    """Forward hooks on each layer's MLP: its output at the last position, every call."""
    outputs = [[] for _ in range(vlm.n_layers)]
    handles = [layer.mlp.register_forward_hook(lambda m, a, out, l=l: outputs[l].append(out[:, -1].detach()))
               for l, layer in enumerate(vlm.layers)]
    return outputs, handles


def _prompt_and_caption(enc, token_ids):
    """One image's prompt with its caption appended, written out here (not with
    ``teacher_forcing.append_captions``) so the finite-difference checks stay independent."""
    return dict(enc, input_ids=torch.cat([enc["input_ids"], torch.tensor([token_ids])], 1),
                attention_mask=torch.ones(1, enc["input_ids"].shape[1] + len(token_ids), dtype=torch.long))


def test_coefficient_times_w_out_is_the_mlp_output(random_vlm, images):
    outputs, handles = _record_mlp_outputs(random_vlm)
    try:
        caps = random_vlm.describe(images, max_new_tokens=5, activation="down_proj_input")
    finally:
        for h in handles:
            h.remove()
    for row, cap in enumerate(caps):
        for layer in range(random_vlm.n_layers):
            w_out = random_vlm.down_proj(layer).weight                     # (D, F)
            for step in range(len(cap.token_ids)):
                written = cap.activations.steps[step, layer] @ w_out.T     # (D,)
                torch.testing.assert_close(written, outputs[layer][step][row], rtol=1e-4, atol=1e-5)


def test_unit_contributions_sum_to_the_mlps_share_of_the_logit(random_vlm, images):
    """Σ_l Σ_i s[l,i,t] + W_U[t]·(rest of the residual) = W_U[t]·h (pre-norm), and
    lm_head(norm(h)) reproduces the model's logits: the score is the logit up to the norm."""
    vlm = random_vlm
    outputs, handles = _record_mlp_outputs(vlm)
    residual = []
    handles.append(vlm.final_norm.register_forward_pre_hook(lambda m, a: residual.append(a[0][:, -1].detach())))
    try:
        enc = vlm.inputs(images[:1])
        caps = vlm.describe(images[:1], max_new_tokens=3, activation="down_proj_input")
        with torch.no_grad():
            logits = vlm.model.generate(**enc, max_new_tokens=1, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True).logits[0][0]
    finally:
        for h in handles:
            h.remove()
    token = int(logits.argmax())
    assert caps[0].token_ids[0] == token
    scores = contribution_scores(vlm, caps[0].activations.steps[0], token)  # (L, F)
    w_u = vlm.lm_head.weight[token]
    h = residual[0][0]
    rest = h - sum(outputs[layer][0][0] for layer in range(vlm.n_layers))
    torch.testing.assert_close(scores.sum() + w_u @ rest, w_u @ h, rtol=1e-4, atol=1e-4)
    for layer in range(vlm.n_layers):  # per layer too
        torch.testing.assert_close(scores[layer].sum(), w_u @ outputs[layer][0][0], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(vlm.lm_head(vlm.final_norm(h)), logits, rtol=1e-4, atol=1e-4)


def test_kv_cache_on_and_off_give_the_same_scores(random_vlm, images):
    on = random_vlm.describe(images, max_new_tokens=4, activation="down_proj_input")
    off = random_vlm.describe(images, max_new_tokens=4, activation="down_proj_input", use_cache=False)
    for a, b in zip(on, off):
        assert a.token_ids == b.token_ids
        token = a.token_ids[-1]
        torch.testing.assert_close(
            contribution_scores(random_vlm, a.activations.steps[-1], token),
            contribution_scores(random_vlm, b.activations.steps[-1], token), rtol=0, atol=1e-5)


def test_image_positions_are_recorded(random_vlm, images):
    cap = random_vlm.describe(images[:1], max_new_tokens=2, activation="down_proj_input",
                              image_activations=True)[0]
    n_image = int(random_vlm.image_token_mask(random_vlm.inputs(images[:1])["input_ids"]).sum())
    assert cap.activations.image.shape == (random_vlm.n_layers, n_image, random_vlm.d_ff)


def test_act_fn_option_records_the_gate_only(random_vlm, images):
    """act_fn × up_proj(x) = the down_proj input, so the two options differ by exactly up(x)."""
    ups = [[] for _ in range(random_vlm.n_layers)]
    handles = [layer.mlp.up_proj.register_forward_hook(lambda m, a, o, l=l: ups[l].append(o[:, -1].detach()))
               for l, layer in enumerate(random_vlm.layers)]
    try:
        gate = random_vlm.describe(images[:1], max_new_tokens=2, activation="act_fn")[0].activations.steps
    finally:
        for h in handles:
            h.remove()
    full = random_vlm.describe(images[:1], max_new_tokens=2, activation="down_proj_input")[0].activations.steps
    for layer in range(random_vlm.n_layers):
        torch.testing.assert_close(gate[0, layer] * ups[layer][0][0], full[0, layer], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(gate, full)


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-instructblip"])
def test_gradient_times_activation_matches_finite_differences(name, images):
    build = build_tiny_llava if name == "tiny-llava" else build_tiny_instructblip
    model, processor = build(seed=2)
    vlm = VLM.from_parts(model.double(), processor, family=name)  # float64: clean differences
    cap = vlm.describe(images[:1], max_new_tokens=3, activation="down_proj_input")[0]
    step, token = 1, cap.token_ids[1]
    enc = vlm.inputs(images[:1])
    (grad_x_act,) = gradient_attributions(vlm, enc, cap.token_ids, [(step, token)], ("noun",))["noun"]
    acts = cap.activations.steps[step]
    pos = enc["input_ids"].shape[1] - 1 + step
    full = _prompt_and_caption(enc, cap.token_ids)

    def prob(layer, unit, eps):
        def nudge(module, args):
            x = args[0].clone()
            x[0, pos, unit] += eps
            return (x,)
        handle = vlm.down_proj(layer).register_forward_pre_hook(nudge)
        try:
            with torch.no_grad():
                return torch.softmax(vlm.model(**full).logits[0, pos].double(), -1)[token].item()
        finally:
            handle.remove()

    # the strongest unit of each layer: RMSNorm computes in float32 even in a float64
    # model, so tiny effects drown in rounding; strong ones are checked to 1 %
    units = [(layer, int(grad_x_act[layer].abs().argmax())) for layer in range(vlm.n_layers)]
    for layer, unit in units:
        eps = 1e-2 * abs(acts[layer, unit].item())
        derivative = (prob(layer, unit, eps) - prob(layer, unit, -eps)) / (2 * eps)
        expected = acts[layer, unit].item() * derivative
        assert grad_x_act[layer, unit].item() == pytest.approx(expected, rel=1e-2)


def test_hooks_are_removed_when_generation_raises(random_vlm, images):
    def boom(module, args):
        raise RuntimeError("boom")
    handle = random_vlm.layers[-1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            random_vlm.describe(images[:1], activation="down_proj_input")
    finally:
        handle.remove()
    assert all(not random_vlm.down_proj(l)._forward_pre_hooks for l in range(random_vlm.n_layers))


def test_contribution_needs_one_row_of_w_u_per_token(random_vlm):
    """The weights used are one mat-vec per layer, equal to the full product's column."""
    token = 20
    full = torch.stack([random_vlm.lm_head.weight @ random_vlm.down_proj(l).weight
                        for l in range(random_vlm.n_layers)])          # (L, V, F): test only
    torch.testing.assert_close(unit_logit_weights(random_vlm, token), full[:, token].detach())


# --- find_neurons on the trained embedded model ------------------------------

def test_find_neurons_table(tiny_llava):
    scene = make_scenes(1, seed=2)[0]
    table = find_neurons(tiny_llava, scene.image, top_k=7)
    assert list(table.columns[:12]) == ["image", "noun", "token_id", "step", "method", "rank", "layer",
                                        "unit", "score", "polarity", "top_tokens", "noun_rank"]
    said = tiny_llava.describe([scene.image])[0]
    assert sorted(table.noun.unique()) == sorted(said.nouns)
    for noun, group in table.groupby("noun"):
        assert list(group["rank"]) == list(range(7))
        assert (np.diff(group.score.to_numpy()) <= 0).all()
        assert all(len(t) == 10 for t in group.top_tokens)


def test_methods_differ_and_random_is_seeded(tiny_llava):
    image = make_scenes(1, seed=3)[0].image
    a = find_neurons(tiny_llava, image, method="random", top_k=20, seed=1)
    b = find_neurons(tiny_llava, image, method="random", top_k=20, seed=1)
    c = find_neurons(tiny_llava, image, method="random", top_k=20, seed=2)
    assert a[["layer", "unit"]].equals(b[["layer", "unit"]])
    assert not a[["layer", "unit"]].equals(c[["layer", "unit"]])
    grad = find_neurons(tiny_llava, image, method="gradient", top_k=20)
    assert len(grad) == len(a)
    at_image = find_neurons(tiny_llava, image, method="gradient_image", top_k=20)
    assert len(at_image) == len(a)
    assert not at_image[["layer", "unit"]].equals(grad[["layer", "unit"]])


def test_noun_not_in_caption_lists_the_caption_nouns(tiny_llava):
    scene = make_scenes(1, seed=2)[0]
    said = tiny_llava.describe([scene.image])[0]
    absent = next(n for n in ["dog", "cat", "car", "tree"] if n not in said.nouns)
    with pytest.raises(NounNotInCaption, match=f"'{absent}' not in the caption.*its nouns are: {said.nouns[0]}"):
        find_neurons(tiny_llava, scene.image, nouns=[absent])


@pytest.mark.parametrize("top_k", [0, -3, 3073, 2.5])
def test_bad_top_k(tiny_llava, top_k):
    with pytest.raises(ValueError, match="top_k must be an integer in 1 … 3072"):
        find_neurons(tiny_llava, make_scenes(1)[0].image, top_k=top_k)


def test_bad_method(tiny_llava):
    with pytest.raises(ValueError, match="method must be one of contribution, gradient, gradient_image, random"):
        find_neurons(tiny_llava, make_scenes(1)[0].image, method="saliency")


def test_random_units_differ_per_noun_and_per_image(tiny_llava):
    images = [s.image for s in make_scenes(4, seed=8)]
    table = find_neurons(tiny_llava, images, method="random", top_k=15, seed=0, image_indices=[10, 11, 12, 13])
    assert sorted(table.image.unique()) == [10, 11, 12, 13]
    sets = [frozenset(zip(g.layer, g.unit)) for _, g in table.groupby(["image", "noun"])]
    assert len(sets) >= 2 and len(set(sets)) == len(sets)


# --- polarity and the image-position gradient --------------------------------

def test_polarity_is_the_sign_of_the_coefficient_and_orients_the_logit_lens(tiny_llava):
    """``polarity`` = sign(a) at the noun step; ``top_tokens`` and ``noun_rank`` are read from
    ``polarity · (W_U · W_out[:, i])``, checked against the full lens computed here."""
    images = [s.image for s in make_scenes(6, seed=21)]
    caps = tiny_llava.describe(images, activation="down_proj_input")
    table = find_neurons(tiny_llava, images, top_k=10, captions=caps)
    assert set(table.polarity) == {-1, 1}          # both directions occur among the top units
    w_u = tiny_llava.lm_head.weight.detach()
    for row in table.itertuples():
        a = caps[row.image].activations.steps[row.step, row.layer, row.unit].item()
        assert row.polarity == (-1 if a < 0 else 1)
        lens = row.polarity * (w_u @ tiny_llava.down_proj(row.layer).weight[:, row.unit].detach())
        assert row.top_tokens == tiny_llava.token_strings(lens.topk(10).indices.tolist())
        assert row.noun_rank == int((lens > lens[row.token_id]).sum())
        # a positive score is the product of two factors of the same sign
        if row.score > 0:
            logit = float(w_u[row.token_id] @ tiny_llava.down_proj(row.layer).weight[:, row.unit].detach())
            assert np.sign(logit) == row.polarity


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-instructblip"])
def test_gradient_at_image_positions_matches_finite_differences(name, images):
    """``gradient_image`` = Σ_{j ∈ image} a_j ∂log p/∂a_j = d log p / dε when every image-position
    coefficient of the unit is scaled by (1 + ε): checked by central differences."""
    build = build_tiny_llava if name == "tiny-llava" else build_tiny_instructblip
    model, processor = build(seed=2)
    vlm = VLM.from_parts(model.double(), processor, family=name)
    cap = vlm.describe(images[:1], max_new_tokens=3, activation="down_proj_input")[0]
    step, token = 1, cap.token_ids[1]
    enc = vlm.inputs(images[:1])
    (attribution,) = gradient_attributions(vlm, enc, cap.token_ids, [(step, token)], ("image",))["image"]
    image = vlm.image_token_mask(enc["input_ids"])[0]
    pos = enc["input_ids"].shape[1] - 1 + step
    full = _prompt_and_caption(enc, cap.token_ids)

    def logp(layer, unit, eps):
        def scale(module, args):
            x = args[0].clone()
            x[0, :len(image)][image, unit] *= 1 + eps
            return (x,)
        handle = vlm.down_proj(layer).register_forward_pre_hook(scale)
        try:
            with torch.no_grad():
                return torch.log_softmax(vlm.model(**full).logits[0, pos].double(), -1)[token].item()
        finally:
            handle.remove()

    units = [(layer, int(attribution[layer].abs().argmax())) for layer in range(vlm.n_layers)]
    for layer, unit in units:
        eps = 1e-3
        expected = (logp(layer, unit, eps) - logp(layer, unit, -eps)) / (2 * eps)
        assert attribution[layer, unit].item() == pytest.approx(expected, rel=2e-2, abs=1e-6)
