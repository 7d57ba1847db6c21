"""The official pipeline beside ours (``mmneurons bench``'s ``official_speedup``): the
reimplementation of the official code's identification picks the same captions, nouns and
steps as ``find_neurons``, runs the full model (vision included) at every generated token,
scores with the gate-only ``act_fn`` output (not our ``down_proj`` input), and the bench
reports the keys. No timing thresholds: timings are measured by ``mmneurons bench``."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmneurons_utils.model import architectures as A
from mmneurons_utils import find_neurons, make_scenes
from mmneurons_utils.batch.official import (OfficialMismatch, check_same_nouns, generate_no_cache,
                                      official_find, official_noun_steps, official_scores,
                                      prepare_official)
from mmneurons_utils.method.scoring import contribution_scores
from mmneurons_utils.model.trace import Trace

pytestmark = pytest.mark.slow   # the slow tier: every test here takes seconds to minutes


@pytest.fixture(scope="module")
def images():
    return [s.image for s in make_scenes(5, seed=21)]


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_instructblip"])
def test_official_picks_our_captions_nouns_and_steps(model, images, request):
    vlm = request.getfixturevalue(model)
    tables = prepare_official(vlm)
    official = official_find(vlm, images, tables, top_k=20)
    captions = vlm.describe(images, batch_size=16, activation="down_proj_input")
    assert check_same_nouns(vlm, captions, official) >= len(images)   # several nouns per scene
    table = find_neurons(vlm, images, top_k=20)                      # what the bench times
    ours = sorted(set(zip(table["image"], table["noun"], table["step"], table["token_id"])))
    theirs = sorted((i, n.noun, n.step, n.token_id) for i, r in enumerate(official) for n in r.nouns)
    assert ours == theirs
    assert [r.text for r in official] == table.attrs["captions"]
    # each kept list is the top of its score map, best first, with the prepared top tokens
    noun = official[0].nouns[0]
    assert noun.units.shape == (20, 2) and np.all(np.diff(noun.scores) <= 0)
    assert noun.top_tokens[0] == tables.top_tokens[tuple(noun.units[0])].tolist()
    # a different caption or step is caught, not averaged over
    bad = [dataclasses.replace(r) for r in official]
    bad[0] = dataclasses.replace(bad[0], nouns=[dataclasses.replace(bad[0].nouns[0], step=bad[0].nouns[0].step + 1)]
                                 + bad[0].nouns[1:])
    with pytest.raises(OfficialMismatch, match="image 0"):
        check_same_nouns(vlm, captions, bad)
    bad = [dataclasses.replace(r) for r in official]
    bad[1] = dataclasses.replace(bad[1], token_ids=bad[1].token_ids[:-2] + [bad[1].token_ids[0]])
    with pytest.raises(OfficialMismatch, match="image 1"):
        check_same_nouns(vlm, captions, bad)


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_instructblip"])
def test_each_generated_token_reruns_the_whole_model(model, images, request):
    """No KV cache: one forward per generated token, each through the vision side (the image
    projector) and over the whole sequence so far."""
    vlm = request.getfixturevalue(model)
    prompt_len = vlm.inputs(images[:1])["input_ids"].shape[1]
    projector = A.resolve(vlm.model, vlm.arch.image_projector)
    with Trace(projector) as vision, Trace(vlm.layers[0], retain_input=True) as first:
        ids, acts = generate_no_cache(vlm, images[0], max_new_tokens=20)
    assert vision.calls == first.calls == len(ids) == acts.shape[0]
    assert first.input.shape[1] == prompt_len + len(ids) - 1          # the last forward: everything
    assert acts.dtype == torch.float16 and acts.shape[1:] == (vlm.n_layers, vlm.d_ff)


def test_official_scores_are_gate_only(tiny_llava, images):
    """The official score of token t is act_fn(gate(x)) · (W_U[t] · W_out), computed here from
    the MLP input by hand; ours uses act_fn(gate(x)) · up(x), and the two rankings differ."""
    vlm = tiny_llava
    assert vlm.model.config.text_config.hidden_act == "silu"
    ids, acts = generate_no_cache(vlm, images[0])
    text = vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    noun, step, token = official_noun_steps(vlm, text, ids)[0]
    official = official_scores(prepare_official(vlm), acts, step, token).float()   # (L, F)

    # independent: the prompt + the caption up to the noun in one forward, each MLP's input
    enc = vlm.inputs(images[:1])
    prefix = torch.tensor([ids[:step]], dtype=enc["input_ids"].dtype)
    enc["input_ids"] = torch.cat([enc["input_ids"], prefix], 1)
    enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(prefix)], 1)
    traces = [Trace(layer.mlp, retain_input=True) for layer in vlm.layers]
    with torch.no_grad():
        for t in traces:
            t.__enter__()
        try:
            vlm.model(**enc)
        finally:
            for t in traces:
                t.close()
        gate_only, coefficient = [], []
        for layer, t in zip(vlm.layers, traces):
            x = t.input[0, -1]
            gate = F.silu(layer.mlp.gate_proj(x))
            gate_only.append(gate)
            coefficient.append(gate * layer.mlp.up_proj(x))
        w = torch.stack([vlm.lm_head.weight[token] @ vlm.down_proj(l).weight for l in range(vlm.n_layers)])
        expected = torch.stack(gate_only) * w                          # W_U[t] · W_out, per unit
        ours_by_hand = torch.stack(coefficient) * w
    scale = expected.abs().max()
    assert torch.allclose(official, expected, rtol=2e-2, atol=2e-3 * scale)       # float16 path
    # ours: the down_proj input, recorded while generating with the KV cache
    caption = vlm.describe(images[:1], activation="down_proj_input")[0]
    ours = contribution_scores(vlm, caption.activations.steps[step], token)
    assert torch.allclose(ours, ours_by_hand, rtol=1e-3, atol=1e-4 * ours_by_hand.abs().max())
    assert not torch.allclose(official, ours, rtol=0.1, atol=0.1 * scale)
    top = lambda s: set(s.flatten().topk(20).indices.tolist())
    assert len(top(official) & top(ours)) < 20


def test_run_bench_reports_the_official_speedup_and_throughput(tiny_llava):
    from mmneurons_utils.batch.bench import run_bench

    result = run_bench(tiny_llava, n_images=4, seed=0, repeats=1, vocab_memory=False)
    assert result["official_speedup"] > 0 and result["official_images_per_s"] > 0
    assert result["official_s"] > 0 and result["official_ours_s"] > 0
    assert result["official_n_nouns"] >= 4 and result["official_forwards_per_image"] > 1
    assert set(result["images_per_s"]) == {"1", "8", "32"}
    assert all(v > 0 for v in result["images_per_s"].values())
    assert result["images_per_s_n_images"] == 32
    # the projection's size is the L × F × V float16 product, not a constant
    shape = tiny_llava.n_layers * tiny_llava.d_ff
    assert result["official_projection_gb"] == round(shape * tiny_llava.lm_head.out_features * 2 / 1e9, 3)
    assert result["ours_logit_weights_mb"] == round(shape * 4 / 1e6, 3)
