"""The widgets on smol-llava (30 layers, a 49,152-token BPE vocabulary): the same static views as
on the tiny models, each checked on what it shows, and the edit playground's undo."""

import pytest
import torch

from mmneurons_utils import load_vlm, make_scenes
from mmneurons_utils.method.identify import find_neurons_by_method
from mmneurons_utils.widgets import (AblationPanel, EditPlayground, InvariancePanel, NeuronExplorer,
                                     SpecificityPanel)

pytestmark = pytest.mark.slow   # the slow tier: every test here takes seconds to minutes


@pytest.fixture(scope="module")
def smol():
    return load_vlm("smol-llava")


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(2, seed=0)


@pytest.fixture(scope="module")
def ident(smol, scenes):
    """The scenes' one identification, which every panel reads (top_k 50: the ablation's k)."""
    return find_neurons_by_method(smol, [s.image for s in scenes], methods=("contribution", "random"),
                                  top_k=50, image_activations=True)


def test_neuron_browser_on_the_pretrained_model(smol, scenes, ident):
    explorer = NeuronExplorer(smol, scenes, ident, top_k=5)
    view = explorer.view()
    noun = view.unit["noun"]
    assert noun in view.caption and len(view.table) == 5
    assert view.table.layer.between(0, 29).all() and view.heatmap is not None   # LLaVA: a patch grid
    assert set(view.table.polarity) <= {-1, 1}
    assert view.caption == ident.captions[explorer.picker.index.value].text
    assert view.table[["layer", "unit"]].values.tolist() == ident.units(noun, 5, image=explorer.picker.index.value).tolist()
    explorer.show()
    assert explorer.heatmap.value


def test_ablation_panel_top_units_hurt_the_noun_more_than_random(smol, scenes, ident):
    panel = AblationPanel(smol, scenes, ident, k=50)
    line, table = panel.view()
    clean, top, rand = table.margin
    assert top < clean - 1.0 and top < rand, table        # the top 50 of 46,080 units, not any 50


def test_property_panels_on_the_pretrained_model(smol, scenes, ident):
    specificity = SpecificityPanel(smol, scenes, ident, k=5)
    line = specificity.view()[0]
    assert line.startswith("caption: ") and f"noun: {specificity.nouns.value}" in line
    before, after = InvariancePanel(smol, scenes, ident, k=5).view()[0].splitlines()
    assert before.startswith("before shuffling: ") and after.startswith("after shuffling: ")


def test_edit_playground_on_the_pretrained_model_and_undo(smol, scenes, ident):
    state = {k: v.detach().clone() for k, v in smol.model.state_dict().items()}
    play = EditPlayground(smol, scenes, others=[s.image for s in make_scenes(4, seed=1)], target="cat",
                          ident=ident)
    edit = play.run_edit()
    assert edit is not None and edit.applied, play.status.value
    assert "cat" in edit.captions_after[0].replace(",", " ").split()
    play.undo()
    assert all(torch.equal(v, state[k]) for k, v in smol.model.state_dict().items())
