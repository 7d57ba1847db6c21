"""Regression tests for fidelity bugs: cluster bootstrap intervals and image tokens in captions."""

import numpy as np
import pandas as pd
import pytest
import torch

from mmneurons_utils import metrics
from mmneurons_utils.properties.stats import bootstrap_ci


def _clustered(n_images: int = 30, rows_per_image: int = 5, seed: int = 0) -> pd.DataFrame:
    """Each image's rows share one value: 5 rows say no more than 1."""
    values = np.random.default_rng(seed).normal(size=n_images)
    return pd.DataFrame(dict(method="m", image=np.repeat(np.arange(n_images), rows_per_image),
                             score=np.repeat(values, rows_per_image)))


def test_cluster_bootstrap_resamples_images_not_rows():
    frame = _clustered()
    one_per_image = frame.drop_duplicates("image")
    summary = metrics.summarize_ci(frame, ["method"], ["score"], seed=4).iloc[0]
    rows = metrics.summarize_ci(frame, ["method"], ["score"], seed=4, cluster=None).iloc[0]
    mean, low, high = bootstrap_ci(one_per_image.score, seed=4)
    assert summary["n"] == 150 and summary["n_clusters"] == 30
    assert summary["mean"] == pytest.approx(mean)
    # 30 images of 5 identical rows carry the information of 30 rows, not 150
    assert (summary["low"], summary["high"]) == pytest.approx((low, high), rel=1e-9, abs=1e-12)
    assert summary["high"] - summary["low"] > 1.5 * (rows["high"] - rows["low"])
    assert rows["n_clusters"] == rows["n"] == 150


def test_cluster_bootstrap_drops_nans_and_weights_rows():
    from mmneurons_utils.properties.stats import cluster_bootstrap_ci

    values = [1.0, np.nan, 3.0, 5.0, np.nan]
    clusters = ["a", "a", "a", "b", "c"]     # c has no value left: it drops out
    mean, low, high = cluster_bootstrap_ci(values, clusters, seed=0)
    assert mean == pytest.approx(3.0)
    assert low == pytest.approx(2.0) and high == pytest.approx(5.0)  # all a, all b
    assert all(np.isnan(cluster_bootstrap_ci([np.nan], ["a"])))
    assert cluster_bootstrap_ci([2.0, 4.0], ["a", "a"]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError, match="same length"):
        cluster_bootstrap_ci([1.0, 2.0], ["a"])


def test_summarize_ci_without_an_image_column_is_the_row_bootstrap():
    frame = _clustered().drop(columns="image")
    summary = metrics.summarize_ci(frame, ["method"], ["score", "absent"], seed=1)
    mean, low, high = bootstrap_ci(frame.score, seed=1)
    first = summary.iloc[0]
    assert (first["mean"], first["low"], first["high"]) == (mean, low, high)
    assert first["n"] == first["n_clusters"] == 150
    assert list(summary.columns) == ["method", "metric", "mean", "low", "high", "n", "n_clusters"]
    assert summary.iloc[1]["n"] == summary.iloc[1]["n_clusters"] == 0


# --- captions never contain the image token ---------------------------------------------
@pytest.mark.parametrize("builder", ["build_tiny_llava", "build_tiny_instructblip"])
def test_caption_never_contains_the_image_token(builder):
    """A random-weight model whose unembedding favours the image token above all others
    (a bias on its logit) still captions without it: the token has no text, and fed back
    it breaks the image-feature count of every later forward."""
    from mmneurons_utils import make_scenes
    from mmneurons_utils.tiny import build
    from mmneurons_utils.model.vlm import VLM

    model, processor = getattr(build, builder)(seed=2)
    vlm = VLM.from_parts(model, processor, family=builder.replace("build_", "").replace("_", "-"))
    image_id = vlm.image_token_id
    assert image_id is not None

    def favour(module, args, out):                       # out: (batch, seq, V) logits
        out = out.clone()
        out[..., image_id] += 1e4
        return out

    handle = vlm.lm_head.register_forward_hook(favour)
    try:
        images = [s.image for s in make_scenes(2, seed=3)]
        with torch.no_grad():
            logits = vlm.model(**vlm.inputs(images[:1])).logits[0, -1]
        assert int(logits.argmax()) == image_id          # unsuppressed, it would be said
        for use_cache in (True, False):
            captions = vlm.describe(images, max_new_tokens=5, use_cache=use_cache)
            for caption in captions:
                assert image_id not in caption.token_ids
    finally:
        handle.remove()
    assert image_id in vlm.placeholder_token_ids
