"""Your own images: a folder (optionally with COCO boxes) goes through the metrics, the
widgets and the notebooks, and gives the scenes' numbers on the scenes' pixels."""

import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmneurons_utils import load_images, make_scenes, metrics
from mmneurons_utils.data.datasets import prepare_model, write_image_folder
from mmneurons_utils.data.objects import boxes_for
from mmneurons_utils.method.identify import find_neurons_by_method
from mmneurons_utils.properties.specificity import presence_source

pytestmark = pytest.mark.slow   # the slow tier: every test here takes seconds to minutes

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The first 12 scenes of seed 0 as PNG files with a COCO annotation file."""
    return write_image_folder(make_scenes(12, seed=0), tmp_path_factory.mktemp("data") / "coco")


def test_specificity_on_the_coco_folder_equals_the_scenes(tiny_llava, coco):
    scenes = load_images(n=12, seed=0)
    folder = load_images(coco, coco / "annotations.json")
    assert folder.kind == "folder" and folder.has_boxes and presence_source(folder) == "labels"
    out = []
    for data in (scenes, folder):
        ident = find_neurons_by_method(tiny_llava, data.images, methods=("contribution", "random"),
                                       top_k=10, image_activations=True)
        out.append(metrics.specificity_scores(tiny_llava, data, ident, k=10))
    pd.testing.assert_frame_equal(*out)
    assert out[0]["mass_in_box"].notna().sum() > 0


def test_a_bare_folder_takes_presence_from_the_captions_and_has_no_box_metrics(tiny_llava, coco):
    bare = load_images(coco)
    assert not bare.has_boxes and presence_source(bare) == "captions"
    assert "mass in box and pointing are skipped" in bare.summary()
    ident = find_neurons_by_method(tiny_llava, bare.images, methods=("contribution",),
                                   top_k=10, image_activations=True)
    caps = ident.captions
    spec = metrics.specificity_scores(tiny_llava, bare, ident, k=10)
    assert "mass_in_box" not in spec or spec["mass_in_box"].isna().all()
    said = {(i, n) for i, c in enumerate(caps) for n in c.nouns}
    assert set(zip(spec.image, spec.noun)) <= said and spec.in_scene.all()
    assert spec.auroc.notna().any()


def test_boxes_are_matched_through_plurals_and_synonyms():
    sample = types.SimpleNamespace(boxes=[("person", (0, 0, 5, 5)), ("dog", (5, 5, 9, 9))],
                                   nouns=["person", "dog"])
    assert boxes_for(sample, "woman") == [(0, 0, 5, 5)]
    assert boxes_for(sample, "dogs") == [(5, 5, 9, 9)]
    assert boxes_for(sample, "cat") == []


# --- nouns of free-form captions --------------------------------------------------------------
@pytest.fixture
def real_vlm():
    """A random-weight LLaVA that is not an embedded model (no noun vocabulary)."""
    from mmneurons_utils.tiny.build import build_tiny_llava
    from mmneurons_utils.model.vlm import VLM

    model, processor = build_tiny_llava(seed=1)
    return VLM.from_parts(model, processor, family="llava")


def test_annotation_categories_are_the_candidate_nouns_without_a_tagger(real_vlm, coco, monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)            # no tagger installed
    assert real_vlm.noun_vocabulary is None
    assert real_vlm.noun_source.startswith("none")
    with pytest.warns(UserWarning, match="spaCy"):
        assert real_vlm.nouns_of("two dogs and a cat") == []
    data = load_images(coco, coco / "annotations.json")
    line = prepare_model(real_vlm, data)
    assert "candidate nouns" in line and "candidate nouns" in real_vlm.noun_source
    first, second = [c for c in data.categories if not c.endswith(("s", "x", "ch", "sh"))][:2]
    assert real_vlm.nouns_of(f"two {first}s and a {second}, no unicorn") == [f"{first}s", second]


def test_the_tagger_keeps_nn_and_nns_and_proper_nouns_on_request(monkeypatch):
    from mmneurons_utils.model import nouns

    tags = {"a": "DT", "dog": "NN", "cats": "NNS", "Paris": "NNP", "runs": "VBZ"}

    class FakeNLP:
        def __call__(self, text):
            return [types.SimpleNamespace(text=w, tag_=tags[w]) for w in text.split()]

    monkeypatch.setitem(nouns._SPACY, "nlp", FakeNLP())
    monkeypatch.setitem(sys.modules, "spacy", types.ModuleType("spacy"))
    assert nouns.tagged_nouns("a dog runs Paris cats") == ["dog", "cats"]
    assert nouns.tagged_nouns("a dog runs Paris cats", proper=True) == ["dog", "paris", "cats"]


# --- widgets -------------------------------------------------------------------------------------
def test_the_picker_lists_the_folders_files_and_keeps_the_upload(coco):
    from PIL import Image

    from mmneurons_utils.widgets import ImagePicker

    folder = load_images(coco)
    picker = ImagePicker(folder)
    labels = [label for label, _ in picker.index.options]
    assert labels[:2] == ["0: image_0000.png", "1: image_0001.png"] and len(labels) == 12
    assert picker.seed.disabled and picker.attribution == ""
    picker.seed.value = 5                                   # no redraw for a folder
    assert [label for label, _ in picker.index.options] == labels
    picker.add_image(Image.new("RGB", (8, 8)), "mine.png")
    assert picker.label == "upload: mine.png" and picker.upload is not None
    from mmneurons_utils.tiny.scenes import ATTRIBUTION

    assert ImagePicker(make_scenes(2, seed=0)).attribution == ATTRIBUTION


# --- the notebooks through the folder path ----------------------------------------------------------
def _run(out: Path, only: str, **parameters) -> dict[str, pd.DataFrame]:
    from mmneurons_utils.companion.run_notebooks import run_all

    run_all(NOTEBOOKS, out, dict(parameters, output_dir=str(out)), only=[only])
    return {p.name: pd.read_csv(p) for p in sorted((out / "tables").glob("*.csv"))}


def _same(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for name in a:   # BERTScore's floats vary ~1e-9 from run to run
        pd.testing.assert_frame_equal(a[name], b[name], check_exact=False, rtol=1e-6, obj=name)


@pytest.mark.notebooks
def test_notebook_02_on_the_coco_folder_gives_the_scenes_numbers(coco, tmp_path):
    small = dict(model="tiny-llava", n_images=12, compare_model="")   # the fast model: three runs
    scenes = _run(tmp_path / "scenes", "02", **small)
    folder = _run(tmp_path / "coco", "02", images=str(coco), annotations=str(coco / "annotations.json"), **small)
    _same(scenes, folder)
    assert "mass_in_box" in set(folder["02_specificity_summary.csv"].metric)
    bare = _run(tmp_path / "bare", "02", images=str(coco), **small)
    assert "mass_in_box" not in set(bare["02_specificity_summary.csv"].metric)
    assert "auroc" in set(bare["02_specificity_summary.csv"].metric)
    _same({k: scenes[k] for k in ("02_noun_hits_summary.csv", "02_sensitivity_summary.csv")},
          {k: bare[k] for k in ("02_noun_hits_summary.csv", "02_sensitivity_summary.csv")})
    executed = (tmp_path / "bare" / "notebooks" / "02_sensitivity.ipynb").read_text()
    assert "skipped (no object boxes)" in executed


@pytest.mark.notebooks
def test_notebook_03_on_the_coco_folder_gives_the_scenes_numbers(coco, tmp_path):
    small = dict(model="tiny-llava", n_region=12, n_images=12, compare_model="")   # the fast model: two runs
    scenes = _run(tmp_path / "scenes", "03", **small)
    folder = _run(tmp_path / "coco", "03", images=str(coco), annotations=str(coco / "annotations.json"), **small)
    _same(scenes, folder)
