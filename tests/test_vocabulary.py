import pytest
import torch

from mmneurons_utils.batch.bench import topk_columns, vocab_memory_probe
from mmneurons_utils.method.scoring import unit_logit_lens, unit_top_tokens
from mmneurons_utils.model.cache import weights_hash


@pytest.mark.parametrize("chunk, block", [(1, 50), (7, 13), (64, 1), (1000, 1000)])
def test_chunked_topk_equals_the_full_product(chunk, block):
    gen = torch.Generator().manual_seed(0)
    w_u, w_out = torch.randn(300, 32, generator=gen), torch.randn(32, 50, generator=gen)
    values, ids = topk_columns(w_u, w_out, k=5, chunk=chunk, block=block)
    full = (w_u @ w_out).topk(5, dim=0)
    assert torch.equal(ids, full.indices.T)
    torch.testing.assert_close(values, full.values.T)


def test_bad_k():
    with pytest.raises(ValueError, match="k must be in 1 … 3"):
        topk_columns(torch.randn(3, 4), torch.randn(4, 2), k=4)


def test_the_lens_reads_each_unit_in_its_polarity(tiny_llava):
    units = torch.tensor([[0, 3], [3, 700], [2, 17]]).numpy()
    w_u = tiny_llava.lm_head.weight
    for sign, largest in ((1, True), (-1, False)):
        lenses = [w_u @ tiny_llava.down_proj(int(l)).weight[:, int(u)] for l, u in units]
        expected = [lens.topk(5, largest=largest).indices.tolist() for lens in lenses]
        assert unit_top_tokens(tiny_llava, units, k=5, polarity=[sign] * 3) == expected
    # the noun's rank: how many tokens the unit writes more strongly than it
    lens = w_u @ tiny_llava.down_proj(3).weight[:, 700]
    token = int(lens.argsort(descending=True)[4])
    _, ranks = unit_logit_lens(tiny_llava, units[1:2], 5, token_ids=[token])
    assert ranks.tolist() == [4]


def test_the_weights_hash_changes_with_an_edit(tiny_llava):
    key = weights_hash(tiny_llava)
    assert weights_hash(tiny_llava) == key
    weight = tiny_llava.down_proj(1).weight
    saved = weight.data.clone()
    try:
        weight.data[:, 0] += 1.0
        assert weights_hash(tiny_llava) != key
    finally:
        weight.data.copy_(saved)
    assert weights_hash(tiny_llava) == key


def test_memory_probe_reports_a_small_fraction():
    result = vocab_memory_probe(d_ff=512, d_model=64, vocab=4000, k=10, chunk=64)
    assert 0 <= result["vocab_memory_fraction"] < 1
    assert result["vocab_full_product_mb"] == pytest.approx(4000 * 512 * 4 / 2**20, rel=1e-2)


@pytest.mark.slow
def test_bench_reports_the_three_ratios(tiny_llava):
    from mmneurons_utils.batch.bench import run_bench

    result = run_bench(tiny_llava, n_images=3, seed=0, repeats=1, vocab_memory=False)
    assert result["overhead_ratio"] > 0.5          # identification includes a full describe
    assert result["gradient_speedup"] > 1          # gradient needs forward + backward per noun
    assert result["gradient_image_speedup"] > 1
    assert result["atlas_ratio"] > 0.5             # the atlas pass includes a full describe
    assert result["n_nouns"] >= 1
