"""The package as one path: every hook goes through ``trace``, the method core never imports
the scenes, and a ``find_neurons`` table is the handoff to ablation, editing and the widgets."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mmneurons_utils import find_neurons, find_neurons_by_method, make_scenes
from mmneurons_utils.interventions.causal import causal_curves
from mmneurons_utils.interventions.editing import edit_token
from mmneurons_utils.method.identification import Identification, units_of
from mmneurons_utils.method.identify import logit_weights, rank_units
from mmneurons_utils.interventions.ablation import added_deltas, as_units, perturb_units
from mmneurons_utils.method.scoring import contribution_scores, top_units
from mmneurons_utils.model.trace import Trace, TraceDict, trace_down_proj
from mmneurons_utils.model.vlm import ModelLoadError, read_noun_vocabulary

PACKAGE = Path(__file__).resolve().parents[1] / "mmneurons_utils"


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "weights" not in p.parts)


def test_every_hook_is_registered_in_trace():
    """``register_forward_hook`` & co. appear in ``trace.py`` only."""
    offenders = [str(p.relative_to(PACKAGE)) for p in _modules() if p.name != "trace.py"
                 and any(word in p.read_text() for word in
                         ("register_forward_pre_hook", "register_forward_hook",
                          "register_full_backward", ".register_hook("))]
    assert offenders == []


@pytest.mark.slow
def test_the_method_core_does_not_import_the_scenes():
    """The layers contract (tests/test_layers.py) keeps ``tiny`` above the method; and importing
    the whole method (with the package's own ``__init__``) loads no scene code."""
    code = ("import sys, mmneurons_utils\n"
            "import mmneurons_utils.method.identify, mmneurons_utils.interventions.causal, mmneurons_utils.interventions.editing, "
            "mmneurons_utils.batch.edit_evaluation, mmneurons_utils.properties.invariance, mmneurons_utils.properties.specificity, "
            "mmneurons_utils.properties.sensitivity, mmneurons_utils.properties.metrics, mmneurons_utils.atlas.build\n"
            "print(sorted(m for m in sys.modules if m.startswith('mmneurons_utils.tiny')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # the package's registries only (tiny/registry.py): no scene code
    assert out.stdout.strip() == "['mmneurons_utils.tiny', 'mmneurons_utils.tiny.registry']"


def test_embedded_vocabulary_comes_from_the_marker(tiny_llava, tmp_path):
    from mmneurons_utils.tiny.scenes import NOUNS

    assert set(tiny_llava.noun_vocabulary) == set(NOUNS)
    assert read_noun_vocabulary(tmp_path) is None                     # no marker: a real model
    (tmp_path / "mmneurons.json").write_text('{"nouns": "scenes"}')
    with pytest.raises(ModelLoadError, match="list of noun words"):
        read_noun_vocabulary(tmp_path)


# --- the tracing helper -----------------------------------------------------------------
def test_trace_reads_edits_and_always_removes_its_hooks():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with Trace(layer, retain_input=True, retain_output=True) as t:
        y = layer(x)
    assert torch.equal(t.input, x) and torch.equal(t.output, y) and t.calls == 1
    with Trace(layer, edit_input=lambda v: v * 0):                   # edits what the module sees
        assert torch.equal(layer(x), layer.bias.expand(4, 2))
    with Trace(layer, edit_output=lambda out, v: out + v.sum(-1, keepdim=True)):
        assert torch.allclose(layer(x), y + x.sum(-1, keepdim=True))
    with Trace(layer, edit_input=lambda v: None):                    # None: an observer
        assert torch.equal(layer(x), y)
    with pytest.raises(RuntimeError, match="boom"):
        with Trace(layer, edit_output=lambda out, v: out * 2):
            raise RuntimeError("boom")
    assert not layer._forward_hooks and not layer._forward_pre_hooks
    assert torch.equal(layer(x), y)


def test_trace_dict_names_its_modules_and_refuses_a_shared_one(tiny_llava):
    seen = []
    with trace_down_proj(tiny_llava, edit_input=lambda x, layer: seen.append(layer)):
        tiny_llava.model(**tiny_llava.inputs([make_scenes(1, seed=2)[0].image]))
    assert seen == list(range(tiny_llava.n_layers))
    shared = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="one module"):
        TraceDict({"a": shared, "b": shared})
    assert all(not tiny_llava.down_proj(l)._forward_pre_hooks for l in range(tiny_llava.n_layers))


def test_added_deltas_equal_the_same_change_of_the_weights(tiny_llava):
    """``a @ Δ`` added to ``down_proj``'s output == ``W_out[:, units] += Δᵀ`` (what editing trains)."""
    vlm = tiny_llava
    inputs = vlm.inputs([make_scenes(1, seed=3)[0].image])
    units = np.array([[0, 5], [3, 700], [3, 2], [1, 9]])
    deltas = torch.randn(len(units), vlm.down_proj(0).out_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), added_deltas(vlm, units, deltas):
        hooked = vlm.model(**inputs).logits
    with torch.no_grad(), perturb_units(vlm, units, mode="scale", factor=1.0):  # restores the weights
        for (layer, unit), delta in zip(units, deltas):
            vlm.down_proj(int(layer)).weight[:, int(unit)] += delta
        edited = vlm.model(**inputs).logits
    assert torch.allclose(hooked, edited, atol=1e-4)
    with pytest.raises(ValueError, match="distinct"):
        with added_deltas(vlm, np.array([[0, 1], [0, 1]]), deltas[:2]):
            pass


# --- rank_units and the table handoff -------------------------------------------------------
@pytest.fixture(scope="module")
def found(tiny_llava):
    images = [s.image for s in make_scenes(3, seed=11)]
    return images, find_neurons(tiny_llava, images, top_k=20)


def test_rank_units_is_the_formula_and_the_table(tiny_llava, found):
    images, table = found
    caption = tiny_llava.describe(images[:1], activation="down_proj_input")[0]
    targets = caption.noun_tokens
    ranked = rank_units(tiny_llava, images[0], caption, targets, ("contribution", "random"), 20,
                        seed=[0, 0], weights=logit_weights(tiny_llava, targets))
    for n, target in enumerate(targets):
        scores = contribution_scores(tiny_llava, caption.activations.steps[target.step], target.token_id)
        assert np.array_equal(ranked["contribution"][n].units, top_units(scores, 20)[0])
        assert np.array_equal(ranked["contribution"][n].units,
                              units_of(table, target.noun, 20, image=0))
        random = find_neurons(tiny_llava, images[:1], method="random", top_k=20, captions=[caption])
        assert np.array_equal(ranked["random"][n].units,
                              units_of(random, target.noun, 20, image=0, method="random"))


def test_units_of_pools_images_by_summed_score_and_names_what_is_missing(found):
    _, table = found
    noun = table.noun.value_counts().index[0]
    rows = table[(table.noun == noun) & (table.method == "contribution")]
    pooled = units_of(table, noun, 5)
    summed = rows.groupby(["layer", "unit"])["score"].sum().sort_values(ascending=False)
    assert [tuple(u) for u in pooled] == [tuple(i) for i in summed.index[:5]]
    with pytest.raises(ValueError, match="no 'contribution' rows for 'zebra'.*nouns there"):
        units_of(table, "zebra", 5)
    with pytest.raises(ValueError, match="larger top_k"):
        units_of(table, noun, 21, image=int(rows.image.iloc[0]))


def test_perturb_units_takes_table_rows(tiny_llava, found):
    _, table = found
    rows = table[table["rank"] < 4]
    assert np.array_equal(as_units(tiny_llava, rows), rows[["layer", "unit"]].to_numpy())
    with pytest.raises(ValueError, match="'layer' and 'unit'"):
        as_units(tiny_llava, rows.drop(columns="unit"))


def test_causal_curves_on_the_identification_equal_the_curves_it_ranks_itself(tiny_llava, found):
    images, _ = found
    ident = find_neurons_by_method(tiny_llava, images[:2], methods=("contribution", "random"), top_k=20,
                                   max_new_tokens=12)
    kwargs = dict(ks=[1, 10], methods=("contribution",))
    own = causal_curves(tiny_llava, ident, images[:2], rerank=True, **kwargs)
    handed = causal_curves(tiny_llava, ident, images[:2], **kwargs)
    assert len(own) > 0 and handed["method"].unique().tolist() == ["contribution"]
    pd.testing.assert_frame_equal(own, handed)
    # an identification whose units differ gives different curves: its units are the ones perturbed
    shifted = Identification(ident.table.assign(unit=lambda t: (t.unit + 1) % tiny_llava.d_ff),
                             ident.captions, ident.image_keys, ident.settings)
    other = causal_curves(tiny_llava, shifted, images[:2], **kwargs)
    assert not np.allclose(other.margin.to_numpy(), own.margin.to_numpy())
    with pytest.raises(ValueError, match="gradient"):
        causal_curves(tiny_llava, ident, images[:2], ks=[1], methods=("gradient",))


def test_edit_token_on_the_tables_units_equals_choosing_them_and_undoes_exactly(tiny_llava, found):
    images, table = found
    source = table[table.image == 0].noun.iloc[0]
    target = "cat" if source != "cat" else "dog"
    before = [tiny_llava.down_proj(l).weight.clone() for l in range(tiny_llava.n_layers)]
    units = units_of(table, source, 5, image=0)
    handed = edit_token(tiny_llava, images[:1], source, target, units=units, steps=30)
    handed.undo()
    chosen = edit_token(tiny_llava, images[:1], source, target, method="contribution", k=5, steps=30)
    chosen.undo()
    assert np.array_equal(units, chosen.units) and np.array_equal(handed.units, chosen.units)
    assert torch.equal(handed.deltas, chosen.deltas)
    assert handed.metrics["unit_choice"] == "given" and chosen.metrics["unit_choice"] == "contribution"
    for l, w in enumerate(before):
        assert torch.equal(tiny_llava.down_proj(l).weight, w)


def test_the_widgets_take_the_identifications_units(tiny_llava):
    from mmneurons_utils.widgets import AblationPanel, EditPlayground, SpecificityPanel

    scenes = make_scenes(2, seed=11)
    ident = find_neurons_by_method(tiny_llava, [s.image for s in scenes], top_k=8, image_activations=True,
                                   methods=("contribution", "random", "selection_null", "noun_contrast"))
    shifted = Identification(ident.table.assign(unit=(ident.table.unit + 1) % tiny_llava.d_ff),  # units
                             ident.captions, ident.image_keys, ident.settings)   # no ranking would give
    panel = AblationPanel(tiny_llava, scenes, shifted, k=4)
    assert panel.k.max == 8
    noun = panel.nouns.value
    assert np.array_equal(panel._ranks[noun][1]["contribution"], shifted.units(noun, 8, image=0))
    play = EditPlayground(tiny_llava, scenes, k=3, ident=shifted)
    assert np.array_equal(play._table_units(play.nouns.value), shifted.units(play.nouns.value, 3, image=0))
    spec = SpecificityPanel(tiny_llava, scenes, shifted, k=3)
    assert spec.caption is shifted.captions[0] and spec.k.max == 8
    assert np.array_equal(spec.table[(spec.table.noun == spec.nouns.value) & (spec.table.method == "contribution")]
                          .sort_values("rank")[["layer", "unit"]].to_numpy()[:3],
                          shifted.units(spec.nouns.value, 3, image=0))
    assert "selection_null" not in spec.method.options
    play.picker.seed.value = 99                                            # other scenes: not in it
    assert play._table_units(play.nouns.value) is None


# --- one result object from identification to the interventions ---------------------------
class _CountGenerate:
    """Counts ``vlm.model.generate`` calls (every caption goes through it)."""

    def __init__(self, vlm, monkeypatch):
        self.calls = 0
        original = vlm.model.generate

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(vlm.model, "generate", counted)


@pytest.mark.slow
def test_the_identification_is_handed_on_without_captioning_again(tiny_llava, monkeypatch):
    from mmneurons_utils import find_neurons_by_method
    from mmneurons_utils.method.identification import Identification

    images = [s.image for s in make_scenes(2, seed=7)]
    found = find_neurons_by_method(tiny_llava, images, methods=("contribution",), top_k=10,
                                   max_new_tokens=12, image_keys=["a.png", "b.png"])
    assert isinstance(found, Identification) and found.image_keys == ["a.png", "b.png"]
    assert found.settings["top_k"] == 10 and found.settings["methods"] == ["contribution"]
    table, captions = found                                         # it unpacks as before
    assert table is found.table and captions is found.captions
    count = _CountGenerate(tiny_llava, monkeypatch)
    handed = causal_curves(tiny_llava, found, images, ks=[1, 10], max_new_tokens=12)
    # the perturbed captions that change only (one generate per batch of them), none for the clean ones
    assert count.calls <= int(handed.changed.sum()) and len(handed)
    with pytest.raises(ValueError, match="max_new_tokens=12"):
        causal_curves(tiny_llava, found, images, ks=[1], max_new_tokens=20)
    # an edit on the identification's units and captions: only the edited caption is generated
    source = found.table[found.table.image == 0].noun.iloc[0]
    count.calls = 0
    edit = edit_token(tiny_llava, images[:1], source, "cat" if source != "cat" else "dog",
                      units=found.units_of(source, 3, image=0), captions=found.captions[:1],
                      steps=2, keep_failed=True, max_new_tokens=12)
    edit.undo()
    assert count.calls == 1 and edit.captions_before == [found.captions[0].text]


def test_a_unit_prints_its_label_in_one_place():
    from mmneurons_utils.method.units import Unit

    assert str(Unit(3, 741, -1)) == "L3.741 (−)" and str(Unit(0, 2)) == "L0.2 (+)"
    row = pd.Series(dict(layer=np.int64(3), unit=np.int64(741), polarity=np.int64(-1), noun="dog"))
    assert Unit.of(row) == Unit(3, 741, -1) == Unit.of(dict(layer=3, unit=741, polarity=-2))
    assert Unit.of(next(pd.DataFrame([dict(layer=1, unit=5)]).itertuples())) == Unit(1, 5, 1)
