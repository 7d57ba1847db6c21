"""The ablation panel and the edit playground: static views, and undo restores the weights."""

import pytest
import torch

from mmneurons_utils import make_scenes
from mmneurons_utils.method.identify import find_neurons_by_method
from mmneurons_utils.widgets import AblationPanel, EditPlayground


def test_ablation_panel_view(tiny_llava):
    scenes = make_scenes(4, seed=0)
    ident = find_neurons_by_method(tiny_llava, [s.image for s in scenes], top_k=50,
                                   methods=("contribution", "random"))
    panel = AblationPanel(tiny_llava, scenes, ident, k=50)
    assert panel.caption is ident.captions[0]                    # its captions: nothing described again
    line, table = panel.view()
    assert "50 units zeroed" in line and list(table.units)[1:] == ["top-50 contribution", "50 random"]
    clean, top, rand = table.margin
    assert top < clean - 1.0 and abs(rand - clean) < 0.5
    panel.sigma.value = 2.0
    assert "noise σ=2" in panel.view()[0]
    with pytest.raises(ValueError, match="3 scenes"):
        AblationPanel(tiny_llava, scenes[:3], ident)
    with pytest.raises(TypeError, match="Identification"):
        AblationPanel(tiny_llava, scenes, ident.table)


@pytest.mark.slow
def test_edit_playground_edit_and_undo(tiny_llava):
    state = {k: v.detach().clone() for k, v in tiny_llava.model.state_dict().items()}
    play = EditPlayground(tiny_llava, make_scenes(4, seed=0), others=[s.image for s in make_scenes(10, seed=1)])
    edit = play.run_edit()
    line, report = play.view()
    assert edit.applied and f"after: {edit.captions_after[0]}" in line
    assert play.target.value in edit.captions_after[0].replace(",", "").split()
    assert 0.0 <= report.loc["other captions unchanged"].iloc[0] <= 1.0
    play.undo()
    assert all(torch.equal(v, state[k]) for k, v in tiny_llava.model.state_dict().items())
    play.nouns.dropdown.value = play.nouns.nouns[0]
    play.target.value = play.nouns.value  # source == target: an error in the status line, no edit
    assert play.run_edit() is None and "same word" in play.status.value
