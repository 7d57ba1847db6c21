"""Dataset examples (streaming top-k), the neuron atlas, its page and ``mmneurons atlas``."""

import numpy as np
import pytest
import torch

from mmneurons_utils import make_scenes
from mmneurons_utils.atlas.examples import ExampleStream, UnitExamples, dataset_examples, purity

pytestmark = pytest.mark.slow   # the slow tier: every test here takes seconds to minutes

E = 4


@pytest.fixture(scope="module")
def scenes12():
    return make_scenes(12, seed=3)


@pytest.fixture(scope="module")
def brute(tiny_llava, scenes12):
    """Top-E of every unit over all images at once: (high values, high images, low values, low images)."""
    caps = tiny_llava.describe([s.image for s in scenes12], max_new_tokens=1,
                               activation="down_proj_input", image_activations=True)
    high = torch.stack([c.activations.image.amax(1) for c in caps], -1)     # (L, F, N)
    low = torch.stack([c.activations.image.amin(1) for c in caps], -1)
    h, l = high.topk(E, -1), low.topk(E, -1, largest=False)
    return h.values, h.indices, l.values, l.indices


@pytest.mark.parametrize("batch_size", [3, 5, 12])
def test_streaming_equals_brute_force_at_both_ends(tiny_llava, scenes12, brute, batch_size):
    ex = dataset_examples(tiny_llava, [s.image for s in scenes12], examples=E, batch_size=batch_size)
    hv, hi, lv, li = brute
    assert torch.equal(ex.high_images, hi) and torch.equal(ex.low_images, li)
    torch.testing.assert_close(ex.high_values, hv)
    torch.testing.assert_close(ex.low_values, lv)
    assert ex.n_images == len(scenes12)
    # top(): best first in the polarity's direction; −1 reads max(−a)
    images, scores = ex.top(2, 17, polarity=1)
    assert images == hi[2, 17].tolist() and scores == sorted(scores, reverse=True)
    images, scores = ex.top(2, 17, polarity=-1)
    assert images == li[2, 17].tolist()
    np.testing.assert_allclose(scores, (-lv[2, 17]).tolist(), rtol=1e-6)
    assert scores == sorted(scores, reverse=True)


def test_memory_does_not_grow_with_the_number_of_images(tiny_llava):
    sizes = []
    for n in (3, 12):
        stream = ExampleStream(tiny_llava.n_layers, tiny_llava.d_ff, E)
        scenes = make_scenes(n, seed=5)
        for start in range(0, n, 3):
            stream.add(tiny_llava.describe([s.image for s in scenes[start:start + 3]], max_new_tokens=1,
                                           activation="down_proj_input", image_activations=True))
        state = stream.result()
        sizes.append([tuple(t.shape) for t in (state.high_values, state.high_images,
                                               state.low_values, state.low_images)])
        assert state.n_images == n
    assert sizes[0] == sizes[1] == [(tiny_llava.n_layers, tiny_llava.d_ff, E)] * 4


def test_fewer_images_than_examples_leaves_empty_slots(tiny_llava):
    ex = dataset_examples(tiny_llava, [s.image for s in make_scenes(2, seed=1)], examples=E)
    images, scores = ex.top(0, 0)
    assert sorted(images) == [0, 1] and len(scores) == 2
    assert np.isnan(purity(UnitExamples(*(torch.full((1, 1, 2), v) for v in (-np.inf, -1, np.inf, -1))),
                           [[0, 0]], [1], [True]))[0]


def test_cache_needs_a_description_and_is_reused(tiny_llava, scenes12, tmp_path, monkeypatch):
    monkeypatch.setenv("MMNEURONS_CACHE", str(tmp_path))
    images = [s.image for s in scenes12]
    dataset_examples(tiny_llava, images, examples=E)
    assert not list(tmp_path.rglob("*.pt"))                     # no description: nothing cached
    first = dataset_examples(tiny_llava, images, examples=E, description="scenes n=12 seed=3")
    assert len(list(tmp_path.rglob("*.pt"))) == 1
    calls = []
    monkeypatch.setattr(tiny_llava, "describe", lambda *a, **k: calls.append(1))
    again = dataset_examples(tiny_llava, images, examples=E, description="scenes n=12 seed=3")
    assert not calls and torch.equal(again.high_images, first.high_images)
    assert again.description == "scenes n=12 seed=3" and again.n_images == 12


def test_purity_counts_top_images_with_the_noun(tiny_llava, scenes12):
    ex = dataset_examples(tiny_llava, [s.image for s in scenes12], examples=E, batch_size=6)
    units, signs = np.array([[1, 5], [3, 300]]), np.array([1, -1])
    contains = np.zeros(len(scenes12), dtype=bool)
    contains[ex.top(1, 5, 1)[0][:3]] = True                     # 3 of unit (1, 5)'s 4 top images
    p = purity(ex, units, signs, contains)
    assert p[0] == pytest.approx(0.75)
    expected = np.mean([contains[i] for i in ex.top(3, 300, -1)[0]])
    assert p[1] == pytest.approx(expected)
    assert (purity(ex, units, signs, np.ones(len(scenes12), bool)) == 1).all()


# --- the atlas -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def atlas48(tiny_llava):
    from mmneurons_utils.atlas.build import build_atlas

    scenes = make_scenes(48, seed=0)
    table, parts = build_atlas(tiny_llava, [s.image for s in scenes], top_k=10, examples=8,
                               batch_size=16, return_parts=True)
    return scenes, table, parts


def test_atlas_columns_and_ranges(atlas48):
    from mmneurons_utils.atlas.build import ATLAS_COLUMNS

    _, table, parts = atlas48
    assert list(table.columns) == ATLAS_COLUMNS and len(table)
    assert table["polarity"].isin([-1, 1]).all()
    assert table["frequency"].between(0, 1).all() and table["purity"].between(0, 1).all()
    assert table["modality"].between(0, 1).all()
    assert not table.duplicated(["noun", "layer", "unit"]).any()
    row = table.iloc[0]
    assert row["example_images"] == parts["examples"].top(row["layer"], row["unit"], row["polarity"])[0]
    # n_images and frequency are those of the captions and the identification table
    said = [row["noun"] in nouns for nouns in parts["nouns"]]
    assert row["n_images"] == sum(said)
    found = parts["found"]
    hits = found[(found.method == "contribution") & (found.noun == row["noun"])
                 & (found.layer == row["layer"]) & (found.unit == row["unit"])]
    assert row["frequency"] == pytest.approx(hits["image"].nunique() / sum(said))


def test_top_unit_of_a_frequent_noun_recurs_and_is_purer_than_random(atlas48):
    from mmneurons_utils.atlas.build import summary

    _, table, _ = atlas48
    noun = table.sort_values(["n_images", "noun"], ascending=[False, True])["noun"].iloc[0]
    rows = table[table.noun == noun]
    assert rows["n_images"].iloc[0] >= 4
    top = rows.iloc[0]
    assert top["frequency"] >= 0.75
    assert top["purity"] > top["purity_random"]
    s = summary(table)
    assert s["purity_contribution"] > 2 * s["purity_random"]


def test_one_pass_identification_equals_find_neurons_by_method(tiny_llava):
    from mmneurons_utils.atlas.build import build_atlas
    from mmneurons_utils.method.identify import find_neurons_by_method

    images = [s.image for s in make_scenes(8, seed=2)]
    _, parts = build_atlas(tiny_llava, images, top_k=5, examples=3, batch_size=3, return_parts=True)
    reference, _ = find_neurons_by_method(tiny_llava, images, methods=("contribution", "random"), top_k=5)
    ours = parts["found"].sort_values(["method", "image", "noun", "rank"], ignore_index=True)
    reference = reference.sort_values(["method", "image", "noun", "rank"], ignore_index=True)
    assert ours[["image", "noun", "method", "layer", "unit", "polarity"]].equals(
        reference[["image", "noun", "method", "layer", "unit", "polarity"]])
    # and the examples gathered on the same pass are dataset_examples'
    examples = dataset_examples(tiny_llava, images, examples=3, batch_size=8)
    assert torch.equal(parts["examples"].high_images, examples.high_images)
    assert torch.equal(parts["examples"].low_images, examples.low_images)


def test_atlas_parquet_round_trip(atlas48, tmp_path):
    from mmneurons_utils.atlas.build import read_atlas, write_atlas

    _, table, _ = atlas48
    path = write_atlas(table, tmp_path / "atlas.parquet", meta={"description": "scenes n=48 seed=0"})
    back, meta = read_atlas(path)
    assert meta == {"description": "scenes n=48 seed=0"}
    assert list(back.columns) == list(table.columns) and len(back) == len(table)
    assert back["example_images"].tolist() == table["example_images"].tolist()
    assert back["top_tokens"].tolist() == table["top_tokens"].tolist()
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(back.drop(columns=["top_tokens", "example_images", "example_scores"]),
                                  table.drop(columns=["top_tokens", "example_images", "example_scores"]))
    assert not list(tmp_path.glob(".*tmp"))


# --- the page ------------------------------------------------------------------------------

def _data_uris(page):
    import re

    return re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)


def test_atlas_page_is_self_contained_small_and_escaped(atlas48, tiny_llava, tmp_path):
    import base64
    import io

    from PIL import Image

    from mmneurons_utils.atlas.page import render_atlas_html

    scenes, table, parts = atlas48
    table = table.copy()
    table.loc[table.noun == table.noun.iloc[0], "noun"] = "<b>x&y</b>"          # hostile noun
    path = render_atlas_html(tiny_llava, table, [s.image for s in scenes], tmp_path / "index.html",
                             captions=parts["captions"], meta={"model": "tiny-llava <m>"},
                             cards_per_noun=2, examples_per_card=3)
    page = path.read_text()
    assert "<b>x&y</b>" not in page and "&lt;b&gt;x&amp;y&lt;/b&gt;" in page
    assert "tiny-llava &lt;m&gt;" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    n_nouns = table.noun.nunique()
    uris = _data_uris(page)
    assert 0 < len(uris) <= n_nouns * 2 * 3
    assert page.count("class='card mmn-card'") == sum(min(2, n) for n in table.groupby("noun").size())
    thumb = Image.open(io.BytesIO(base64.b64decode(uris[0])))
    assert thumb.size == (64, 64)
    print(f"page {len(page)} chars, {len(uris)} thumbnails")
    assert len(page) < 30_000 * n_nouns                                       # modest
    # the thumbnails carry the unit's map: not the plain image
    row = table.iloc[0]
    plain = np.asarray(scenes[row["example_images"][0]].image.convert("RGB").resize((64, 64)), dtype=float)
    shown = np.asarray(thumb.convert("RGB"), dtype=float)
    print("overlay difference", np.abs(shown - plain).mean())
    assert np.abs(shown - plain).mean() > 8                      # dimmed where p·a is low


def test_atlas_page_without_patch_grid_shows_plain_images(tiny_instructblip, tmp_path):
    import base64
    import io

    import pandas as pd
    from PIL import Image

    from mmneurons_utils.atlas.build import ATLAS_COLUMNS
    from mmneurons_utils.atlas.page import render_atlas_html

    scenes = make_scenes(3, seed=0)
    row = dict(noun="cat", layer=1, unit=2, polarity=-1, frequency=1.0, n_images=2, base_rate=0.5,
               mean_score=0.1, top_tokens=["cat", "dog"], noun_rank=0, purity=1.0, purity_random=0.3,
               modality=0.4, example_images=[2, 0], example_scores=[0.5, 0.4])
    path = render_atlas_html(tiny_instructblip, pd.DataFrame([row], columns=ATLAS_COLUMNS),
                             [s.image for s in scenes], tmp_path / "index.html")
    page = path.read_text()
    assert "L1.2 (−)" in page and "<b>cat</b>" in page
    uris = _data_uris(page)
    assert len(uris) == 2
    thumb = np.asarray(Image.open(io.BytesIO(base64.b64decode(uris[0]))).convert("RGB"), dtype=float)
    plain = np.asarray(scenes[2].image.convert("RGB").resize((64, 64)), dtype=float)
    assert np.abs(thumb - plain).mean() < 4                      # the image itself (palette-quantised)


# --- mmneurons atlas -----------------------------------------------------------------------

def test_cli_atlas_writes_parquet_and_page_and_reuses_a_finished_run(tmp_path, cli):
    import json

    from mmneurons_utils.atlas.build import read_atlas

    out = tmp_path / "atlas"
    argv = ["atlas", "--model", "tiny-llava", "--scenes", "24", "--seed", "0", "--top-k", "5",
            "--examples", "4", "--out", str(out), "--json"]
    code, stdout, _ = cli(*argv)
    assert code == 0
    result = json.loads(stdout.strip().splitlines()[-1])
    assert {"n_images", "n_nouns", "n_units", "purity_contribution", "purity_random",
            "peak_rss_mb"} <= set(result)
    assert result["n_images"] == 24 and result["n_nouns"] > 0 and not result["resumed"]
    assert result["purity_contribution"] > result["purity_random"]
    assert result["peak_rss_mb"] > 0
    table, meta = read_atlas(out / "atlas.parquet")
    assert table["noun"].nunique() == result["n_nouns"] and meta["n_images"] == 24
    page = (out / "index.html").read_text()
    assert "data:image/png;base64," in page and "Neuron atlas" in page
    assert not list(out.glob(".*tmp"))
    # the same settings again: reused, the same numbers
    code, stdout, _ = cli(*argv)
    again = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and again["resumed"]
    assert again["purity_contribution"] == result["purity_contribution"]
    assert again["n_units"] == result["n_units"]
    # other settings on the same folder: refused, not overwritten
    code, _, err = cli(*[a if a != "5" else "6" for a in argv])
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "another run" in errors[0]


def test_cli_atlas_recomputes_when_the_checkpoint_changes_at_the_same_path(tmp_path, cli):
    """The settings name the model by its path: editing one ``down_proj`` weight of the saved
    checkpoint makes the next run recompute (and say so) instead of reusing the old atlas."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from mmneurons_utils.atlas.build import read_atlas
    from mmneurons_utils.model.embedded import embedded_folder

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(embedded_folder("tiny-llava"), checkpoint)
    out = tmp_path / "atlas"
    argv = ["atlas", "--model", str(checkpoint), "--scenes", "8", "--seed", "1", "--top-k", "5",
            "--examples", "3", "--out", str(out), "--json"]

    def run():
        code, stdout, err = cli(*argv)
        assert code == 0, err[-2000:]
        return json.loads(stdout.strip().splitlines()[-1]), err

    first, _ = run()
    _, meta = read_atlas(out / "atlas.parquet")
    assert not first["resumed"] and not first["weights_changed"] and len(meta["weights"]) == 32
    again, err = run()
    assert again["resumed"] and not again["weights_changed"] and "recomputing" not in err
    # the same path, one weight of one unit's write vector changed
    tensors = load_file(checkpoint / "model.safetensors")
    key = "language_model.model.layers.2.mlp.down_proj.weight"
    tensors[key][0, 7] += 0.5
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    from mmneurons_utils.atlas.page import GENERATOR

    stale = f"<!DOCTYPE html><html><head>{GENERATOR}</head><body>stale page</body></html>"
    (out / "index.html").write_text(stale)             # a page of its own, from the old weights
    changed, err = run()
    assert not changed["resumed"] and changed["weights_changed"]
    notes = [line for line in err.splitlines() if "other weights" in line]
    assert len(notes) == 1 and "recomputing" in notes[0] and "error" not in notes[0]
    _, new_meta = read_atlas(out / "atlas.parquet")
    assert new_meta["weights"] != meta["weights"] and new_meta["description"] == meta["description"]
    assert (out / "index.html").read_text() != stale                  # the page was rewritten too
    assert not list(out.glob(".*tmp"))
    settled, _ = run()                                                # the new weights: reused
    assert settled["resumed"] and not settled["weights_changed"]


@pytest.mark.parametrize("extra, needle", [
    (["--top-k", "100000"], "top_k must be"),
    (["--out", "/no/such/parent/atlas"], "does not exist"),
])
def test_cli_atlas_bad_values_exit_2_with_one_line(extra, needle, cli, tmp_path):
    argv = ["atlas", "--scenes", "2", "--out", str(tmp_path / "a")] + extra
    code, _, err = cli(*argv)
    errors = [line for line in err.splitlines() if "error:" in line]   # (model loading bars aside)
    assert code == 2 and len(errors) == 1 and needle in errors[0]
    assert errors[0].startswith("mmneurons atlas: error:")
    assert not (tmp_path / "a").exists()                                  # no work, no folder


def test_cli_atlas_out_must_be_a_folder_and_examples_positive(cli, tmp_path):
    (tmp_path / "file").write_text("x")
    code, _, err = cli("atlas", "--scenes", "2", "--out", str(tmp_path / "file"))
    assert code == 2 and "not a folder" in err
    with pytest.raises(SystemExit) as exit_info:
        cli("atlas", "--scenes", "2", "--examples", "0", "--out", str(tmp_path / "b"))
    assert exit_info.value.code == 2


def test_example_strip_draws_a_units_top_images(atlas48, tiny_llava):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmneurons_utils.plots.atlas import example_strip

    scenes, table, parts = atlas48
    row = table.iloc[0]
    fig = example_strip(tiny_llava, [s.image for s in scenes], row, n=4, captions=parts["captions"])
    assert len([ax for ax in fig.axes if ax.images]) == 4
    assert f"L{row['layer']}.{row['unit']}" in fig._suptitle.get_text()
    plt.close(fig)


def test_browser_dataset_strip(tiny_llava):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmneurons_utils.widgets.explorer import NeuronExplorer

    from mmneurons_utils.method.identify import find_neurons_by_method

    scenes = make_scenes(12, seed=0)
    ident = find_neurons_by_method(tiny_llava, [s.image for s in scenes[:8]], methods=("contribution",),
                                   top_k=5, image_activations=True)
    explorer = NeuronExplorer(tiny_llava, scenes, ident, top_k=5)   # it holds 8 of the 12 scenes
    unit = explorer.selected()
    fig = explorer.dataset_strip(n=4)
    assert len([ax for ax in fig.axes if ax.images]) == 4
    assert f"L{unit['layer']}.{unit['unit']}" in fig._suptitle.get_text()
    first = explorer._examples
    assert first[1].n_images == 12                            # all the scenes: one prefill pass
    plt.close(fig)
    plt.close(explorer.dataset_strip(n=3))
    assert explorer._examples is first                        # gathered once per scene list


def test_summary_top_unit_purity_takes_each_nouns_most_frequent_unit():
    import pandas as pd

    from mmneurons_utils.atlas.build import summary

    table = pd.DataFrame(dict(
        noun=["dog", "dog", "cat"], layer=[3, 2, 3], unit=[1, 2, 5], frequency=[1.0, 0.5, 0.8],
        mean_score=[1.0, 2.0, 1.0], purity=[0.75, 0.25, 0.5], purity_random=[0.0, 0.0, 0.125],
        base_rate=[0.1, 0.1, 0.05], modality=[0.5, 0.5, 0.5]))
    got = summary(table)
    assert got["purity_top_unit"] == (0.75 + 0.5) / 2          # dog's L3.1, cat's L3.5
    assert got["purity_contribution"] == 0.5 and got["n_nouns"] == 2 and got["n_units"] == 3


def test_units_kept_for_most_nouns_are_flagged_generic_and_left_out_of_specific_purity():
    import pandas as pd

    from mmneurons_utils.atlas.build import flag_generic, summary

    rows = []
    for i, noun in enumerate(["cat", "dog", "car", "tree"]):
        # unit (3, 7) is kept for every noun with purity at the base rate; each noun has its own unit
        rows.append(dict(noun=noun, layer=3, unit=7, polarity=1, purity=0.1, purity_random=0.1,
                         frequency=1.0, mean_score=1.0, base_rate=0.1, modality=0.5))
        rows.append(dict(noun=noun, layer=2, unit=i, polarity=-1, purity=0.9, purity_random=0.1,
                         frequency=0.6, mean_score=0.5, base_rate=0.1, modality=0.5))
    table = flag_generic(pd.DataFrame(rows))
    assert table.loc[table.unit == 7, "generic"].all() and not table.loc[table.layer == 2, "generic"].any()
    assert table.loc[table.unit == 7, "noun_share"].eq(1.0).all()
    s = summary(table)
    assert s["n_generic_units"] == 1
    assert s["purity_specific"] == pytest.approx(0.9) and s["purity_contribution"] == pytest.approx(0.5)
    # two nouns sharing a unit is not "generic": the rule needs three or more nouns
    two = flag_generic(pd.DataFrame(rows[:4]))
    assert not two["generic"].any()
