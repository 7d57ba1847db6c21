"""The batched causal path (several conditions of one image in one batch, per-row hooks,
one teacher-forced forward, one cached ``generate``) equals perturbing the weights one
condition at a time, on both embedded architectures; ``causal_curves`` takes an Identification."""

import numpy as np
import pytest
import torch

from mmneurons_utils import make_scenes
from mmneurons_utils.interventions.ablation import RowPerturbation, perturb_rows
from mmneurons_utils.interventions.causal import (causal_curves, measure_conditions,
                                                  measure_sequentially, summarize, table_rankings)
from mmneurons_utils.method.identify import find_neurons_by_method
from mmneurons_utils.model.teacher_forcing import teacher_forced_logits

# measured: max |Δ| 6.7e-6 (tiny-llava) and 2.9e-6 (tiny-instructblip) over margins and
# probabilities; batching changes only the float summation order (noise is added as a_units @ Δ)
TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["tiny_llava", "tiny_instructblip"])
def vlm(request):
    return request.getfixturevalue(request.param)


def _weights(vlm):
    return [vlm.down_proj(layer).weight.detach().clone() for layer in range(vlm.n_layers)]


def test_batched_conditions_equal_the_sequential_reference(vlm):
    images = [s.image for s in make_scenes(2, seed=7)]
    captions = vlm.describe(images)
    rng = np.random.default_rng(0)
    before = _weights(vlm)
    worst, checked, moved, changed = 0.0, 0, 0, 0
    for image, caption in zip(images, captions):
        if not caption.noun_tokens:
            continue
        prompt_len = vlm.inputs([image])["input_ids"].shape[1]
        conditions = [(caption.noun_tokens[0], None)]
        for j in range(6):
            target = caption.noun_tokens[j % len(caption.noun_tokens)]
            n = (30, 600)[j % 2]
            units = np.stack([rng.integers(0, vlm.n_layers, n), rng.integers(0, vlm.d_ff, n)], 1)
            conditions.append((target, (RowPerturbation(units, "zero"),
                                        RowPerturbation(units, "noise", sigma=2.0, seed=j,
                                                        relative=bool(j % 2)),
                                        RowPerturbation(units, "zero",
                                                        positions=(prompt_len - 1 + target.step,)))[j // 2]))
        batched = measure_conditions(vlm, image, caption, conditions, batch_size=4)  # 2 batches
        for (target, row), got in zip(conditions, batched):
            want = measure_sequentially(vlm, image, caption, target, row)
            assert got == {**want, "margin": got["margin"], "prob": got["prob"]}   # captions identical
            worst = max(worst, abs(got["margin"] - want["margin"]), abs(got["prob"] - want["prob"]))
            moved += abs(want["margin"] - batched[0]["margin"]) > 0.1 and target == conditions[0][0]
            checked += 1
            changed += got["changed"]
    assert checked >= 12 and moved >= 3          # the conditions do change the margin
    assert 0 < changed < checked                 # both kinds of row: generated again, and kept
    assert worst < TOLERANCE, worst
    for layer, w in enumerate(before):           # the batched path never writes a weight
        assert torch.equal(vlm.down_proj(layer).weight, w)


def test_rows_do_not_leak_into_each_other(tiny_llava):
    """A clean row beside a heavily perturbed one gives the clean logits; a batch of the wrong
    size inside the block is refused."""
    vlm = tiny_llava
    image = make_scenes(1, seed=3)[0].image
    caption = vlm.describe([image])[0]
    clean = teacher_forced_logits(vlm, [image], [caption.token_ids])[0]
    units = np.array([(l, u) for l in range(vlm.n_layers) for u in range(0, vlm.d_ff, 3)])
    with perturb_rows(vlm, [RowPerturbation(units, "noise", sigma=3.0), None]):
        both = teacher_forced_logits(vlm, [image, image], [caption.token_ids] * 2)
        with pytest.raises(ValueError, match="batch 1"):
            teacher_forced_logits(vlm, [image], [caption.token_ids])
    torch.testing.assert_close(both[1], clean, rtol=0, atol=1e-5)
    assert (both[0] - clean).abs().max() > 1.0


@pytest.fixture(scope="module")
def identified(tiny_llava):
    images = [s.image for s in make_scenes(4, seed=0)]
    return images, find_neurons_by_method(tiny_llava, images, top_k=20, seed=0,
                                          methods=("contribution", "random", "selection_null"))


def test_curves_read_the_identification(tiny_llava, identified):
    """k ≤ top_k: the table's units; reranking from the captions' activations gives the same
    contribution units (hence the same rows); the identified units beat random ones."""
    images, ident = identified
    table = causal_curves(tiny_llava, ident, images, ks=(5, 20), methods=("contribution", "random"))
    again = causal_curves(tiny_llava, ident, images, ks=(5, 20), methods=("contribution",),
                          rerank=True)
    top = table[table.method == "contribution"].reset_index(drop=True)
    numbers = ["margin", "prob", "margin_drop", "prob_drop"]    # other batch-mates: float order only
    np.testing.assert_allclose(again[numbers], top[numbers], rtol=0, atol=TOLERANCE)
    assert again.drop(columns=numbers).equals(top.drop(columns=numbers))
    assert (table.caption_clean == table.image.map(dict(enumerate(ident.texts)))).all()
    s = summarize(table).set_index(["method", "k"])
    assert s.loc[("contribution", 20), "margin_drop"] > 3 * abs(s.loc[("random", 20), "margin_drop"])
    assert s.loc[("contribution", 20), "margin_drop"] > s.loc[("contribution", 5), "margin_drop"] > 0
    nulls = causal_curves(tiny_llava, ident, images, ks=(5,), methods=("selection_null",))
    assert nulls.draw.nunique() == 5             # each of the null's draws


def test_curves_refuse_what_they_cannot_read(tiny_llava, identified):
    images, ident = identified
    with pytest.raises(TypeError, match="Identification"):
        causal_curves(tiny_llava, images, ident)
    with pytest.raises(ValueError, match="4 images' captions, but 3"):
        causal_curves(tiny_llava, ident, images[:3])
    with pytest.raises(ValueError, match="selection_null is matched"):
        causal_curves(tiny_llava, ident, images, ks=(21,), methods=("selection_null",))
    with pytest.raises(ValueError, match="max_new_tokens=20"):
        causal_curves(tiny_llava, ident, images, ks=(1,), max_new_tokens=12)
    with pytest.raises(ValueError, match="top 20"):
        table_rankings(ident.table, ident.captions, ("contribution",), 21)


def test_a_k_above_top_k_ranks_from_the_captions(tiny_llava, identified):
    """k = 30 > top_k = 20: ranked from the identification's captions' activations (no
    generation); its top 5 are the table's top 5, so the k = 5 rows are the same."""
    images, ident = identified
    wide = causal_curves(tiny_llava, ident, images, ks=(5, 30), methods=("contribution",))
    table = causal_curves(tiny_llava, ident, images, ks=(5,), methods=("contribution",))
    narrow = wide[wide.k == 5].reset_index(drop=True)
    numbers = ["margin", "prob", "margin_drop", "prob_drop"]    # other batch-mates: float order only
    np.testing.assert_allclose(narrow[numbers], table[numbers], rtol=0, atol=TOLERANCE)
    assert narrow.drop(columns=numbers).equals(table.drop(columns=numbers))
    assert set(wide.k) == {5, 30}


def test_a_generation_setting_beyond_argmax_generates_every_row(tiny_llava):
    """The kept-caption shortcut holds for plain greedy decoding only: with a repetition penalty
    every row is generated, and the rows still equal the sequential reference."""
    from mmneurons_utils.interventions.causal import _plain_greedy

    vlm = tiny_llava
    image = make_scenes(1, seed=4)[0].image
    units = np.array([(l, u) for l in range(vlm.n_layers) for u in range(0, vlm.d_ff, 40)])
    assert _plain_greedy(vlm)
    config = vlm.model.generation_config
    try:
        config.repetition_penalty = 1.3
        assert not _plain_greedy(vlm)
        caption = vlm.describe([image])[0]          # the clean caption under this setting
        target = caption.noun_tokens[0]
        conditions = [(target, None), (target, RowPerturbation(units[:5], "zero")),
                      (target, RowPerturbation(units, "noise", sigma=3.0, seed=1))]
        batched = measure_conditions(vlm, image, caption, conditions)
        for (t, row), got in zip(conditions, batched):
            want = measure_sequentially(vlm, image, caption, t, row)
            assert got == {**want, "margin": got["margin"], "prob": got["prob"]}
            assert abs(got["margin"] - want["margin"]) < TOLERANCE
    finally:
        config.repetition_penalty = 1.0
