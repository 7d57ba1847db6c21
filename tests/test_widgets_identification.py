"""The browser, the noun picker and the atlas read one Identification: the images it holds are
neither captioned nor identified again, and what they show are its numbers (or, for the atlas
without ``ident``, exactly the streaming pass's)."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from mmneurons_utils import make_scenes  # noqa: E402
from mmneurons_utils.method.identify import find_neurons, find_neurons_by_method  # noqa: E402


@pytest.fixture(scope="module")
def scenes6():
    return make_scenes(6, seed=0)


@pytest.fixture(scope="module")
def ident6(tiny_llava, scenes6):
    return find_neurons_by_method(tiny_llava, [s.image for s in scenes6], methods=("contribution", "random"),
                                  top_k=10, image_activations=True)


@pytest.fixture
def count_describe(tiny_llava, monkeypatch):
    """The number of images each ``describe`` call gets, from here on."""
    describe, calls = tiny_llava.describe, []
    monkeypatch.setattr(tiny_llava, "describe",
                        lambda images, *a, **k: calls.append(len(images)) or describe(images, *a, **k))
    return calls


def test_browser_reads_the_identification_and_captions_only_new_images(tiny_llava, scenes6, ident6,
                                                                        count_describe):
    from mmneurons_utils.widgets import NeuronExplorer

    explorer = NeuronExplorer(tiny_llava, scenes6, ident6, top_k=5)
    explorer.show()                                            # outside a front end: a repr
    for index in (1, 2, 3, 0):
        heatmap = explorer.heatmap.value
        explorer.image.value = index
        assert explorer.tokens.caption is ident6.captions[index]
        assert explorer.heatmap.value != heatmap and explorer.last_update_s is not None
        for noun in explorer.tokens.nouns:
            explorer.noun.value = noun
            rows = explorer.rows()
            expected = ident6.table[(ident6.table.image == index) & (ident6.table.noun == noun)
                                    & (ident6.table.method == "contribution") & (ident6.table["rank"] < 5)]
            # the identification's rows, bit for bit (scores and polarity included)
            cols = ["rank", "layer", "unit", "polarity", "score"]
            assert rows[cols].equals(expected[cols].reset_index(drop=True))
            assert ident6.units(noun, 5, image=index).tolist() == rows[["layer", "unit"]].values.tolist()
    assert count_describe == []                               # nothing captioned again
    # an image the identification does not hold: one captioning pass, its own ranking
    other = make_scenes(1, seed=7)[0].image
    explorer.picker.add_image(other, "other.png")
    assert count_describe == [1]
    expected = find_neurons(tiny_llava, other, top_k=5)
    expected = expected[expected.noun == explorer.tokens.value]
    assert explorer.rows()[["layer", "unit"]].values.tolist() == expected[["layer", "unit"]].values.tolist()


def test_browser_units_are_those_of_an_identification_of_the_image_alone(tiny_llava, scenes6):
    """The browser adds nothing of its own: given the identification of one image it shows
    exactly ``find_neurons`` of that image (what it computed itself before)."""
    from mmneurons_utils.widgets import NeuronExplorer

    scene = scenes6[2]
    alone = find_neurons_by_method(tiny_llava, [scene.image], methods=("contribution",), top_k=5,
                                   image_activations=True)
    explorer = NeuronExplorer(tiny_llava, [scene], alone, top_k=5)
    reference = find_neurons(tiny_llava, scene.image, top_k=5)
    for noun in explorer.tokens.nouns:
        explorer.noun.value = noun
        want = reference[reference.noun == noun][["rank", "layer", "unit", "polarity", "score"]]
        assert explorer.rows()[want.columns].equals(want.reset_index(drop=True))


def test_browser_refuses_a_table_too_few_units_and_other_images(tiny_llava, scenes6, ident6):
    from mmneurons_utils.widgets import NeuronExplorer

    with pytest.raises(TypeError, match="Identification"):
        NeuronExplorer(tiny_llava, scenes6, ident6.table, top_k=5)
    with pytest.raises(ValueError, match="top 10"):
        NeuronExplorer(tiny_llava, scenes6, ident6, top_k=20)
    with pytest.raises(ValueError, match="contents differ"):
        NeuronExplorer(tiny_llava, make_scenes(6, seed=1), ident6, top_k=5)
    bare = find_neurons_by_method(tiny_llava, [scenes6[0].image], methods=("contribution",), top_k=5)
    with pytest.raises(ValueError, match="image_activations=True"):
        NeuronExplorer(tiny_llava, scenes6[:1], bare, top_k=5)


def test_browser_dataset_strip_from_the_identification(tiny_llava, scenes6, ident6, count_describe):
    from mmneurons_utils.atlas.examples import dataset_examples
    from mmneurons_utils.widgets import NeuronExplorer

    explorer = NeuronExplorer(tiny_llava, scenes6, ident6, top_k=5, examples=True, strip_n=3)
    unit = explorer.selected()
    fig = explorer.dataset_strip(n=3)
    assert count_describe == []                               # examples and maps: read
    found = explorer._examples[1]
    reference = dataset_examples(tiny_llava, [s.image for s in scenes6], examples=8)
    assert found.top(unit["layer"], unit["unit"], unit["polarity"])[0] == \
        reference.top(unit["layer"], unit["unit"], unit["polarity"])[0]
    best = reference.top(unit["layer"], unit["unit"], unit["polarity"])[0][:3]
    assert [ax.get_title().split()[0] for ax in fig.axes if ax.images] == [f"#{i}" for i in best]
    plt.close(fig)


def test_noun_picker_reads_captions_from_the_identification(tiny_llava, scenes6, ident6, count_describe):
    from mmneurons_utils.widgets import ImagePicker, TokenPicker

    picker = ImagePicker(scenes6)
    tokens = TokenPicker(tiny_llava).link(picker, ident6)
    for index in (0, 3, 5):
        picker.select(index)
        assert tokens.caption is ident6.captions[index] and tokens.nouns == list(
            dict.fromkeys(ident6.captions[index].nouns))
    assert count_describe == []
    picker.seed.value = 9                                      # other scenes: captioned
    assert count_describe and tokens.caption.text == tiny_llava.describe([picker.image])[0].text
    with pytest.raises(ValueError, match="not the picker's first scenes"):
        TokenPicker(tiny_llava).link(ImagePicker(make_scenes(6, seed=2)), ident6)


# --- the atlas ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scenes20():
    return make_scenes(20, seed=1)


def test_atlas_from_the_identification_equals_the_streaming_pass(tiny_llava, scenes20, monkeypatch):
    """An identification of the first batch (same top_k, methods, seed): the atlas is the
    streaming pass's exactly, and those images are not captioned again."""
    from mmneurons_utils.atlas.build import build_atlas

    images = [s.image for s in scenes20]
    plain, parts = build_atlas(tiny_llava, images, top_k=5, examples=4, batch_size=8, return_parts=True)
    ident = find_neurons_by_method(tiny_llava, images[:8], methods=("contribution", "random"), top_k=5,
                                   image_activations=True)
    describe, calls = tiny_llava.describe, []
    monkeypatch.setattr(tiny_llava, "describe",
                        lambda batch, *a, **k: calls.append(len(batch)) or describe(batch, *a, **k))
    read, read_parts = build_atlas(tiny_llava, images, top_k=5, examples=4, batch_size=8,
                                   return_parts=True, ident=ident)
    assert calls == [8, 4]                                    # images 8 … 19 only
    pd.testing.assert_frame_equal(read, plain)
    assert read_parts["captions"] == parts["captions"]
    for name in ("high_images", "low_images", "high_values", "low_values"):
        assert torch.equal(getattr(read_parts["examples"], name), getattr(parts["examples"], name))


def test_atlas_reads_a_larger_identifications_top_units(tiny_llava, scenes20):
    """top_k 5 read from an identification of top_k 20: the same contribution units (frequency,
    purity, polarity, lens), the random baseline from its draws; other images refused."""
    from mmneurons_utils.atlas.build import build_atlas

    images = [s.image for s in scenes20[:8]]
    plain = build_atlas(tiny_llava, images, top_k=5, examples=4)
    ident = find_neurons_by_method(tiny_llava, images, methods=("contribution", "random"), top_k=20,
                                   image_activations=True)
    read = build_atlas(tiny_llava, images, top_k=5, examples=4, ident=ident)
    same = ["noun", "layer", "unit", "polarity", "frequency", "n_images", "purity", "modality",
            "noun_rank", "example_images", "generic"]
    pd.testing.assert_frame_equal(read[same], plain[same])
    np.testing.assert_allclose(read["mean_score"], plain["mean_score"], rtol=1e-6)
    assert read["purity_random"].between(0, 1).all()
    with pytest.raises(ValueError, match="contents differ"):
        build_atlas(tiny_llava, [s.image for s in scenes20[8:16]], top_k=5, ident=ident)
    with pytest.raises(ValueError, match="top 20"):
        build_atlas(tiny_llava, images, top_k=30, ident=ident)
    with pytest.raises(ValueError, match="contribution and random"):
        build_atlas(tiny_llava, images, top_k=5, ident=find_neurons_by_method(
            tiny_llava, images, methods=("contribution",), top_k=5, image_activations=True))


def test_atlas_page_and_strip_read_the_maps_from_the_identification(tiny_llava, scenes20, tmp_path,
                                                                     monkeypatch):
    from mmneurons_utils.atlas.build import build_atlas
    from mmneurons_utils.atlas.page import render_atlas_html
    from mmneurons_utils.plots.atlas import example_strip

    images = [s.image for s in scenes20[:8]]
    ident = find_neurons_by_method(tiny_llava, images, methods=("contribution", "random"), top_k=5,
                                   image_activations=True)
    table = build_atlas(tiny_llava, images, top_k=5, examples=4, ident=ident)
    plain = render_atlas_html(tiny_llava, table, images, tmp_path / "plain.html").read_text()
    describe, calls = tiny_llava.describe, []
    monkeypatch.setattr(tiny_llava, "describe",
                        lambda batch, *a, **k: calls.append(len(batch)) or describe(batch, *a, **k))
    page = render_atlas_html(tiny_llava, table, images, tmp_path / "index.html", ident=ident).read_text()
    row = table.iloc[0]
    fig = example_strip(tiny_llava, images, row, n=3, ident=ident)
    assert calls == []                                        # no prefill: the maps are read
    assert page.count("mmn-thumb") == plain.count("mmn-thumb") > 0
    assert page.count("mmn-card") == plain.count("mmn-card")
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles[0].startswith(f"#{row['example_images'][0]}")
    assert ident.captions[row["example_images"][0]].text.split()[0] in titles[0]   # its caption
    plt.close(fig)


def test_identification_examples_equal_a_prefill_pass(tiny_llava, scenes6, ident6):
    from mmneurons_utils.atlas.examples import dataset_examples, identification_examples

    read = identification_examples(ident6, examples=3)
    ran = dataset_examples(tiny_llava, [s.image for s in scenes6], examples=3, batch_size=6)
    assert torch.equal(read.high_images, ran.high_images) and torch.equal(read.low_images, ran.low_images)
    torch.testing.assert_close(read.high_values, ran.high_values)
    assert read.n_images == 6


def test_browser_strip_over_other_images_runs_them(tiny_llava, scenes6, ident6, count_describe):
    """A UnitExamples over images the identification does not hold: their maps need a prefill."""
    from mmneurons_utils.atlas.examples import dataset_examples
    from mmneurons_utils.widgets import NeuronExplorer

    other = make_scenes(5, seed=4)
    found = dataset_examples(tiny_llava, [s.image for s in other], examples=3)
    count_describe.clear()
    explorer = NeuronExplorer(tiny_llava, scenes6, ident6, top_k=5, examples=found, example_images=other)
    unit = explorer.selected()
    fig = explorer.dataset_strip(n=3)
    assert count_describe == [3]                              # the three strip images, once
    best = found.top(unit["layer"], unit["unit"], unit["polarity"])[0][:3]
    assert [ax.get_title().split()[0] for ax in fig.axes if ax.images] == [f"#{i}" for i in best]
    plt.close(fig)
