"""Editing flips a caption on the trained tiny model, undo() restores it bit-for-bit,
failed edits leave the weights alone, bad input gets a clear error."""

import pytest
import torch

from mmneurons_utils import load_vlm
from mmneurons_utils.editing import EditInputError, ScenePool, edit_token


def _state(vlm):
    return {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}


def _assert_same_state(vlm, state):
    current = vlm.model.state_dict()
    assert all(torch.equal(current[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def pool(tiny_llava):
    return ScenePool.build(tiny_llava, 80, seed=3)


@pytest.fixture(scope="module")
def case(pool):
    """A source said in at least three captions, a different target noun, images without it."""
    source = next(n for n in pool.nouns() if len(pool.with_noun(n)) >= 3)
    target = "cat" if source != "cat" else "dog"
    edit_imgs = [pool.images[i] for i in pool.with_noun(source)[:2]]
    heldout = [pool.images[i] for i in pool.with_noun(source)[2:]]
    without = [pool.images[i] for i in pool.without_noun(source)]
    return dict(source=source, target=target, images=edit_imgs, heldout=heldout,
                unrelated=without[:4], locality=without[4:14])


@pytest.fixture(scope="module")
def edit(tiny_llava, case):
    state = _state(tiny_llava)
    clean = [c.text for c in tiny_llava.describe(case["images"] + case["locality"])]
    edit = edit_token(tiny_llava, case["images"], case["source"], case["target"], n_neurons=5,
                      unrelated=case["unrelated"], seed=0)
    yield dict(edit=edit, state=state, clean=clean)
    edit.undo()
    _assert_same_state(tiny_llava, state)


def test_edit_flips_the_caption_and_undo_restores_bit_for_bit(tiny_llava, case, edit):
    e, state, clean = edit["edit"], edit["state"], edit["clean"]
    assert e.converged and e.applied and e.final_margin > 1.0
    assert e.metrics["success"] == 1.0 and e.metrics["n_neurons"] == 5
    after = [c.text for c in tiny_llava.describe(case["images"])]
    for before, now in zip(clean, after):
        assert case["target"] in now.split(", ")[0].split() + now.replace(",", "").split()
        assert case["source"] not in now.replace(",", "").split()
        # only the noun changed: same words elsewhere
        assert now.replace(",", "").split() == [case["target"] if w == case["source"] else w
                                                 for w in before.replace(",", "").split()]
    changed = sum(not torch.equal(v, state[k]) for k, v in tiny_llava.model.state_dict().items())
    assert changed == len({int(l) for l, _ in e.units})  # only down_proj weights of the units' layers
    e.undo()
    _assert_same_state(tiny_llava, state)
    assert [c.text for c in tiny_llava.describe(case["images"] + case["locality"])] == clean
    e.apply()  # re-applying gives the same edited captions
    assert [c.text for c in tiny_llava.describe(case["images"])] == after


def test_evaluate_reports_side_effects(tiny_llava, case, edit):
    e = edit["edit"]
    out = e.evaluate(case["heldout"], case["locality"])
    assert e.applied  # evaluate leaves the edit as it found it
    assert 0.0 <= out["generalization"] <= 1.0 and out["n_locality"] == len(case["locality"])
    assert out["locality"] >= 0.8        # captions without the source stay put
    assert 0.0 <= out["locality_kl"] < 0.05


def test_save_pretrained_round_trip(tiny_llava, case, edit, tmp_path):
    e = edit["edit"]
    path = e.save_pretrained(tmp_path / "edited")
    assert not [p for p in tmp_path.iterdir() if p.name != "edited"]  # no temp folder left
    reloaded = load_vlm(path)
    assert reloaded.embedded
    assert [c.text for c in reloaded.describe(case["images"])] == \
           [c.text for c in tiny_llava.describe(case["images"])]
    with pytest.raises(EditInputError, match="already exists"):
        e.save_pretrained(path)


def test_failed_edit_is_reported_and_leaves_the_weights(tiny_llava, case, edit):
    edit["edit"].undo()  # the shared edit is applied while the tests above run
    state = _state(tiny_llava)
    failed = edit_token(tiny_llava, case["images"], case["source"], case["target"], n_neurons=2,
                        units="random", steps=3, seed=1)
    assert not failed.converged and not failed.applied and failed.metrics["success"] == 0.0
    assert failed.final_margin < 1.0 and failed.steps == 3
    _assert_same_state(tiny_llava, state)
    with pytest.raises(EditInputError, match="not applied"):
        failed.save_pretrained("/tmp/never-written")
    kept = edit_token(tiny_llava, case["images"], case["source"], case["target"], n_neurons=2,
                      units="random", steps=3, seed=1, keep_failed=True)
    assert kept.applied and not kept.converged
    assert any(not torch.equal(v, state[k]) for k, v in tiny_llava.model.state_dict().items())
    kept.undo()
    _assert_same_state(tiny_llava, state)


def test_bad_input_names_the_choices(tiny_llava, case, edit):
    edit["edit"].undo()
    images, source = case["images"], case["source"]
    with pytest.raises(EditInputError, match="not in the caption.*nouns said"):
        edit_token(tiny_llava, images, "octopus" if source != "octopus" else "whale", "cat")
    with pytest.raises(EditInputError, match="choose one of: apple"):
        edit_token(tiny_llava, images, source, "spaceship")
    with pytest.raises(EditInputError, match="same word"):
        edit_token(tiny_llava, images, source, source)
    with pytest.raises(EditInputError, match="units must be one of"):
        edit_token(tiny_llava, images, source, case["target"], units="best")
    with pytest.raises(EditInputError, match="in none of the"):
        ScenePool([], []).split("dog")
