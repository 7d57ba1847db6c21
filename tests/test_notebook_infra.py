"""The notebook infrastructure: outputs on disk and inline, the runner, the pickers, the browser."""

from __future__ import annotations

import io

import matplotlib
import pandas as pd
import pytest

matplotlib.use("agg")


def test_save_table_writes_csv_with_flat_lists(tmp_path):
    from mmneurons_utils.companion.tables import save_table

    df = pd.DataFrame({"unit": [3, 5], "top_tokens": [["cat", "dog"], ["sun"]]})
    path = save_table(df, tmp_path, "t")
    assert path == tmp_path / "tables" / "t.csv"
    assert path.read_text().splitlines() == ["unit,top_tokens", "3,cat dog", "5,sun"]
    indexed = save_table(pd.Series([0.5, 0.25], index=pd.Index([0, 1], name="layer"), name="share"),
                         tmp_path, "s")
    assert indexed.read_text().splitlines()[0] == "layer,share"


def test_outputs_saves_full_figure_and_shows_a_small_copy(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from mmneurons_utils import make_scenes, plots
    from mmneurons_utils.companion import outputs

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    fig = plots.scene_grid(make_scenes(8, seed=0))
    full = io.BytesIO()
    fig.savefig(full, format="png", dpi=110, bbox_inches="tight")
    out = outputs.Outputs(tmp_path)
    path = out.figure(fig, "scenes")
    assert path == tmp_path / "figures" / "scenes.png" and path.stat().st_size > 0
    assert len(shown) == 1 and shown[0].format == "png"
    assert len(shown[0].data) < len(full.getvalue()) / 3      # the inline copy is compact
    assert not plt.fignum_exists(fig.number)                  # closed: not shown twice
    df = pd.DataFrame({"a": [1]})
    assert out.table(df, "a") is df and (tmp_path / "tables" / "a.csv").exists()


def test_runner_parameters_and_strip(tmp_path):
    import nbformat

    from mmneurons_utils.companion.run_notebooks import _parameter, notebook_paths, strip_for_git

    assert _parameter(["model", "llava-hf/llava-1.5-7b-hf"]) == ("model", "llava-hf/llava-1.5-7b-hf")
    assert _parameter(["n_images=8"]) == ("n_images", 8)
    assert _parameter(["device", "cuda"]) == ("device", "cuda")
    assert _parameter(["compare_model", ""]) == ("compare_model", "")   # -p compare_model ""
    for bad in (["model"], ["model="]):
        with pytest.raises(SystemExit):
            _parameter(bad)
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("1")]
    nb.cells[0].metadata["papermill"] = {"duration": 1.0}
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.metadata["papermill"] = {"start_time": "now"}
    path = tmp_path / "00_x.ipynb"
    nbformat.write(nb, str(path))
    (tmp_path / "notes.ipynb").write_text("{}")
    assert notebook_paths(tmp_path) == [path]
    strip_for_git(path)
    clean = nbformat.read(str(path), as_version=4)
    assert "widgets" not in clean.metadata and "papermill" not in clean.metadata
    assert "papermill" not in clean.cells[0].metadata


def test_image_picker_seed_index_and_upload():
    from PIL import Image

    from mmneurons_utils import make_scenes
    from mmneurons_utils.widgets import ImagePicker

    picker = ImagePicker(seed=3, n=4)
    seen = []
    picker.observe(lambda p: seen.append(p.label))
    assert picker.scene == make_scenes(4, seed=3)[0]
    picker.select(2)
    assert picker.scene.index == 2 and seen == ["scene 2 (seed 3)"]
    picker.seed.value = 5                                      # same index, other seed: one event
    assert picker.scene.caption == make_scenes(4, seed=5)[2].caption and len(seen) == 2
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(buffer, format="PNG")
    picker.upload.value = ({"name": "red.png", "content": memoryview(buffer.getvalue()),
                            "type": "image/png", "size": len(buffer.getvalue()),
                            "last_modified": __import__("datetime").datetime.now()},)
    assert picker.scene is None and picker.label == "upload: red.png"
    assert picker.image.size == (40, 30) and picker.image.mode == "RGB" and len(seen) == 3
    picker.select(0)
    assert picker.scene.index == 0


def test_token_picker_offers_the_caption_nouns(tiny_llava):
    from mmneurons_utils import make_scenes
    from mmneurons_utils.widgets import ImagePicker, TokenPicker

    picker = ImagePicker(make_scenes(4, seed=0))
    tokens = TokenPicker(tiny_llava).link(picker)
    assert tokens.nouns == tokens.caption.nouns and tokens.value == tokens.nouns[0]
    assert all("<b" in tokens.html() for _ in tokens.nouns)
    picker.select(1)
    assert tokens.caption.text == tiny_llava.describe([picker.image])[0].text
    assert tokens.view().startswith("caption: ")


def test_neuron_browser_static_view_and_fast_changes(tiny_llava, monkeypatch):
    """An image change reads the scenes' identification (no captioning pass) and shows the new
    image's caption, its units and heatmap; how long it takes is ``mmneurons bench``'s
    ``explorer_update_s`` (widgets/timing.py), not asserted here."""
    from mmneurons_utils import make_scenes
    from mmneurons_utils.method.identify import find_neurons_by_method
    from mmneurons_utils.widgets import NeuronExplorer

    scenes = make_scenes(6, seed=0)
    ident = find_neurons_by_method(tiny_llava, [s.image for s in scenes], methods=("contribution",),
                                   top_k=5, image_activations=True)
    explorer = NeuronExplorer(tiny_llava, scenes, ident, top_k=5)
    view = explorer.view()
    assert len(view.table) == 5 and view.unit["rank"] == 0
    assert view.bars is not None and view.heatmap is not None
    explorer.show()                                            # outside a front end: a repr
    first = (explorer.tokens.text, explorer.heatmap.value)
    assert first[1]                                            # rendered once shown
    describe, passes = tiny_llava.describe, []
    monkeypatch.setattr(tiny_llava, "describe",
                        lambda images, *a, **k: passes.append(len(images)) or describe(images, *a, **k))
    for index in (1, 2, 3):
        heatmap = explorer.heatmap.value
        explorer.image.value = index
        assert passes == []                                    # read, not captioned again
        assert explorer.last_update_s is not None and explorer.heatmap.value != heatmap
        assert explorer.tokens.caption is ident.captions[index]
        noun = explorer.tokens.value
        assert explorer.rows()[["layer", "unit"]].values.tolist() == ident.units(noun, 5, image=index).tolist()
    assert (explorer.tokens.text, explorer.heatmap.value) != first
    explorer.units.value = 2
    assert "rank 2" in explorer.unit_info.value


def test_time_explorer_reports_the_browsers_response_time(tiny_llava):
    from mmneurons_utils.widgets.timing import time_explorer

    ticks = iter(range(1000))
    result = time_explorer(tiny_llava, n_scenes=3, repeats=2, top_k=3, clock=lambda: next(ticks))
    assert result == dict(explorer_update_s=1, explorer_update_median_s=1, explorer_updates=6)


def test_neuron_browser_without_patch_grid(tiny_instructblip):
    from mmneurons_utils import make_scenes
    from mmneurons_utils.widgets import NeuronExplorer

    from mmneurons_utils.method.identify import find_neurons_by_method

    scenes = make_scenes(4, seed=0)
    ident = find_neurons_by_method(tiny_instructblip, [s.image for s in scenes], methods=("contribution",),
                                   top_k=3, image_activations=True)
    explorer = NeuronExplorer(tiny_instructblip, scenes, ident, top_k=3)
    view = explorer.view()
    assert view.heatmap is None and len(view.table) == 3
    explorer.show()
    assert explorer.heatmap.value                              # a placeholder image


def test_neuron_browser_shows_the_selected_units_dataset_strip(tiny_llava):
    import matplotlib.pyplot as plt

    from mmneurons_utils import make_scenes
    from mmneurons_utils.atlas.examples import dataset_examples
    from mmneurons_utils.widgets import NeuronExplorer

    from mmneurons_utils.method.identify import find_neurons_by_method

    scenes = make_scenes(8, seed=0)
    ident = find_neurons_by_method(tiny_llava, [s.image for s in scenes], methods=("contribution",),
                                   top_k=5, image_activations=True)
    plain = NeuronExplorer(tiny_llava, scenes, ident, top_k=5)          # opt-in: off by default
    assert plain.strip is None and plain.view().strip is None
    explorer = NeuronExplorer(tiny_llava, scenes, ident, top_k=5, examples=True, strip_n=3)
    view = explorer.view()
    assert len([ax for ax in view.strip.axes if ax.images]) == 3
    plt.close(view.strip)
    explorer.show()
    first = bytes(explorer.strip.value)
    assert first.startswith(b"\x89PNG") and explorer.strip in explorer.widget().children
    explorer.units.value = 2                                            # click another unit
    second = bytes(explorer.strip.value)
    assert second.startswith(b"\x89PNG") and second != first
    explorer.units.value = 0
    assert bytes(explorer.strip.value) == first                                # drawn once, kept
    # a UnitExamples over other images: the strip shows those images, best first
    other = make_scenes(6, seed=4)
    found = dataset_examples(tiny_llava, [s.image for s in other], examples=3)
    given = NeuronExplorer(tiny_llava, scenes, ident, top_k=5, examples=found, example_images=other,
                           strip_n=3)
    unit = given.selected()
    fig = given.dataset_strip(n=3)
    best = found.top(unit["layer"], unit["unit"], unit["polarity"])[0]
    assert [ax.get_title().split()[0] for ax in fig.axes if ax.images] == [f"#{i}" for i in best]
    plt.close(fig)
    with pytest.raises(ValueError, match="only 2"):
        NeuronExplorer(tiny_llava, scenes, ident, top_k=5, examples=found, example_images=other[:2])


def test_runner_makes_path_parameters_absolute(tmp_path, monkeypatch):
    """Notebooks run inside notebooks/: a relative folder given on the command line must still
    name the caller's folder."""
    from mmneurons_utils.companion.run_notebooks import _absolute_paths

    (tmp_path / "photos").mkdir()
    monkeypatch.chdir(tmp_path)
    out = _absolute_paths({"images": "photos", "annotations": "missing.json", "model": "tiny-llava",
                           "n_images": 8})
    assert out == {"images": str(tmp_path / "photos"), "annotations": "missing.json",
                   "model": "tiny-llava", "n_images": 8}
