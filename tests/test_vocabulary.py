import pytest
import torch

from mmneurons_utils.batch.bench import vocab_memory_probe
from mmneurons_utils.method.scoring import unit_top_tokens
from mmneurons_utils.method.vocabulary import neuron_vocabulary, topk_columns


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


def test_table_is_cached_by_weights_and_edits_change_the_key(tiny_llava, tmp_path, monkeypatch):
    monkeypatch.setenv("MMNEURONS_CACHE", str(tmp_path))
    table = neuron_vocabulary(tiny_llava, k=5)
    assert table.ids.shape == (4, 768, 5)
    assert len(list(tmp_path.rglob("*.pt"))) == 1
    again = neuron_vocabulary(tiny_llava, k=5)
    assert torch.equal(again.ids, table.ids)
    # the table agrees with the direct per-unit logit lens used in find_neurons
    units = torch.tensor([[0, 3], [3, 700], [2, 17]]).numpy()
    assert unit_top_tokens(tiny_llava, units, k=5) == [table.ids[l, u].tolist() for l, u in units]
    # both ends are kept: a unit of polarity −1 reads the bottom of its lens
    negative = unit_top_tokens(tiny_llava, units, k=5, polarity=[-1, -1, -1])
    assert negative == [table.top_ids(l, u, -1) for l, u in units]
    for l, u in units:
        lens = tiny_llava.lm_head.weight @ tiny_llava.down_proj(int(l)).weight[:, int(u)]
        assert table.top_ids(l, u, -1) == lens.topk(5, largest=False).indices.tolist()
        torch.testing.assert_close(table.bottom_logits[l, u], -lens.topk(5, largest=False).values.detach())
    weight = tiny_llava.down_proj(1).weight
    saved = weight.data.clone()
    try:
        weight.data[:, 0] += 1.0
        neuron_vocabulary(tiny_llava, k=5)
        assert len(list(tmp_path.rglob("*.pt"))) == 2
    finally:
        weight.data.copy_(saved)


def test_memory_probe_reports_a_small_fraction():
    result = vocab_memory_probe(d_ff=512, d_model=64, vocab=4000, k=10, chunk=64)
    assert 0 <= result["vocab_memory_fraction"] < 1
    assert result["vocab_full_product_mb"] == pytest.approx(4000 * 512 * 4 / 2**20, rel=1e-2)


def test_bench_reports_the_three_ratios(tiny_llava):
    from mmneurons_utils.batch.bench import run_bench

    result = run_bench(tiny_llava, n_images=3, seed=0, repeats=1, vocab_memory=False)
    assert result["overhead_ratio"] > 0.5          # identification includes a full describe
    assert result["gradient_speedup"] > 1          # gradient needs forward + backward per noun
    assert result["gradient_image_speedup"] > 1
    assert result["atlas_ratio"] > 0.5             # the atlas pass includes a full describe
    assert result["n_nouns"] >= 1
