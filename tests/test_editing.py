"""Editing flips a caption on the trained tiny model, undo() restores it bit-for-bit,
failed edits leave the weights alone, bad input gets a clear error; the evaluation scores a
failed edit's side effects as unknown (NaN, not the unchanged model's 1 / 0) and does not score
images whose caption already said the target."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mmneurons_utils import load_vlm, make_scenes
from mmneurons_utils.model.nouns import says
from mmneurons_utils.batch.edit_evaluation import ImagePool, edit_table, run_edit, summarize_edits
from mmneurons_utils.interventions.editing import EditInputError, edit_token, evaluate_edit

pytestmark = pytest.mark.slow   # the slow tier: every test here takes seconds to minutes


def _state(vlm):
    return {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}


def _assert_same_state(vlm, state):
    current = vlm.model.state_dict()
    assert all(torch.equal(current[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def pool(tiny_llava):
    return ImagePool.build(tiny_llava, [s.image for s in make_scenes(80, seed=3)])


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
    edit = edit_token(tiny_llava, case["images"], case["source"], case["target"], k=5,
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
    out = evaluate_edit(e, case["heldout"], case["locality"])
    assert e.applied  # evaluate leaves the edit as it found it
    assert 0.0 <= out["generalization"] <= 1.0 and out["n_locality"] == len(case["locality"])
    assert out["locality"] >= 0.8        # captions without the source stay put
    assert 0.0 <= out["locality_kl"] < 0.05
    # one suite: the package's names are the free-running EasyEdit-style ones, in the report too
    assert out["generalization"] == out["m_generality_free"] == e.report.generalization
    assert out["locality"] == out["m_locality_free"] == e.report.m_locality_free
    assert e.metrics["success"] == e.metrics["reliability_free"] == 1.0
    assert out["reliability"] == 1.0 and out["m_locality"] >= 0.9


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
    failed = edit_token(tiny_llava, case["images"], case["source"], case["target"], k=2,
                        method="random", steps=3, seed=1)
    assert not failed.converged and not failed.applied and failed.metrics["success"] == 0.0
    assert failed.final_margin < 1.0 and failed.steps == 3
    _assert_same_state(tiny_llava, state)
    with pytest.raises(EditInputError, match="not applied"):
        failed.save_pretrained("/tmp/never-written")
    kept = edit_token(tiny_llava, case["images"], case["source"], case["target"], k=2,
                      method="random", steps=3, seed=1, keep_failed=True)
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
    with pytest.raises(EditInputError, match="method must be one of"):
        edit_token(tiny_llava, images, source, case["target"], method="best")
    with pytest.raises(EditInputError, match="to choose them by a scoring method pass method='random'"):
        edit_token(tiny_llava, images, source, case["target"], units="random")
    with pytest.raises(EditInputError, match="out of range"):
        edit_token(tiny_llava, images, source, case["target"], units=[(99, 0)])
    with pytest.raises(EditInputError, match="in none of the"):
        ImagePool([], []).split("dog")


# --- honest evaluation: failed edits, already-said targets ------------------------------
def _isnan(x) -> bool:
    return isinstance(x, float) and math.isnan(x)


@pytest.fixture(scope="module")
def together(pool):
    """A source and a target said together in one pool caption, and two captions saying the
    source without the target."""
    for source in pool.nouns():
        said = pool.with_noun(source)
        for target in sorted({n for i in said for n in pool.captions[i].nouns} - {source}):
            both = [i for i in said if says(pool.captions[i].text, target)]
            alone = [i for i in said if i not in both]
            if both and len(alone) >= 2:
                return dict(source=source, target=target, both=both, alone=alone)
    pytest.skip("no caption of the pool says two nouns that also occur apart")


def test_a_failed_edit_has_no_side_effect_scores(tiny_llava, pool, case, edit):
    edit["edit"].undo()
    state = _state(tiny_llava)
    failed = run_edit(tiny_llava, pool, case["source"], case["target"], k=1, method="random",
                      steps=1, n_edit=2, n_unrelated=4, n_locality=6, seed=1)
    m = failed.metrics
    # the unchanged model says nothing about locality or generalisation: NaN, not 1 / 0
    assert _isnan(m["locality"]) and _isnan(m["locality_kl"]) and _isnan(m["generalization"])
    assert not failed.converged and m["applied"] is False and m["success"] == 0.0
    _assert_same_state(tiny_llava, state)
    # no held-out image left (every image saying the source is an edit image): NaN as well
    n_said = len(pool.with_noun(case["source"]))
    failed = run_edit(tiny_llava, pool, case["source"], case["target"], k=1, method="random",
                      steps=1, n_edit=n_said, n_unrelated=4, n_locality=6, seed=1)
    assert failed.metrics["n_heldout"] == 0 and _isnan(failed.metrics["generalization"])


def test_summary_scores_side_effects_over_applied_edits_only(tiny_llava, pool, case, edit):
    edit["edit"].undo()
    pair = [(case["source"], case["target"])]
    kwargs = dict(configs=[("contribution", 5)], n_edit=2, n_unrelated=4, n_locality=10)
    good = edit_table(tiny_llava, pool, pair, **kwargs)
    bad = edit_table(tiny_llava, pool, pair, steps=1, **kwargs)
    assert bad.locality.isna().all() and bad.locality_kl.isna().all()
    assert good["applied"].tolist() == [True] and bad["applied"].tolist() == [False]
    summary = summarize_edits(pd.concat([good, bad], ignore_index=True))
    row = summary.iloc[0]
    assert (row.n_pairs, row.n_applied) == (2, 1)
    assert row.success == pytest.approx((good.success[0] + 0.0) / 2)   # success: over every pair
    for col in ("locality", "locality_kl", "weight_norm", "relative_norm"):  # side effects: applied only
        assert row[col] == pytest.approx(good[col][0]), col
    assert good.locality_kl[0] > 0
    none_applied = summarize_edits(bad)
    assert _isnan(float(none_applied.locality[0])) and none_applied.n_applied[0] == 0


def test_images_already_saying_the_target_are_not_scored(tiny_llava, pool, together, edit):
    edit["edit"].undo()
    source, target = together["source"], together["target"]
    both, alone = [pool.images[i] for i in together["both"]], [pool.images[i] for i in together["alone"]]
    # only an image that already says the target: nothing to score
    e = edit_token(tiny_llava, both[:1], source, target, k=5, seed=0)
    e.undo()
    assert _isnan(e.metrics["success"]) and e.metrics["n_excluded_target"] == 1
    # with an image saying the source alone: success is that image's flip only
    e = edit_token(tiny_llava, alone[:1] + both[:1], source, target, k=5, seed=0)
    e.undo()
    flipped = says(e.captions_after[0], target) and not says(e.captions_after[0], source)
    assert e.metrics["n_excluded_target"] == 1 and e.metrics["success"] == float(flipped)
    # held-out images already saying the target are not counted either
    e.apply()
    out = evaluate_edit(e, both + alone[1:], ())
    e.undo()
    assert out["n_heldout"] == len(alone) - 1
    # the pool's split keeps them out of both the edit and the held-out images, and says how many
    parts = pool.split(source, n_edit=1, target=target)
    assert sorted(parts["excluded_target"]) == sorted(together["both"])
    assert not set(parts["excluded_target"]) & set(parts["edit"] + parts["heldout"])
    assert all(says(pool.captions[i].text, source) and not says(pool.captions[i].text, target)
               for i in parts["edit"] + parts["heldout"])


def test_playground_reports_a_failed_edit_as_not_applied(tiny_llava, pool, case, edit):
    from mmneurons_utils.widgets import EditPlayground

    edit["edit"].undo()
    play = EditPlayground(tiny_llava, make_scenes(2, seed=0))
    play.edit = run_edit(tiny_llava, pool, case["source"], case["target"], k=1, method="random",
                         steps=1, n_edit=2, n_unrelated=4, n_locality=6, seed=1)
    line, report = play.view()
    col = report.iloc[:, 0]
    assert "(not applied)" in line and col["applied"] == False  # noqa: E712
    assert col["other captions unchanged"] == "not applied" == col["KL on other images (nats)"]


def test_cli_edit_json_says_applied_and_null_for_unmeasured(cli):
    def strict(text):  # bare NaN / Infinity is not JSON
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))

    code, out, _ = cli("edit", "--source", "dog", "--target", "cat", "--scenes", "40", "--seed", "0",
                       "--units", "random", "--n-neurons", "1", "--steps", "1", "--json")
    r = strict(out.strip().splitlines()[-1])
    assert code == 0 and r["applied"] is False and r["converged"] is False and r["success"] == 0.0
    assert r["locality"] is None and r["locality_kl"] is None and r["generalization"] is None
    assert isinstance(r["n_excluded_target"], int)
    code, out, _ = cli("edit", "--source", "dog", "--target", "cat", "--scenes", "40", "--seed", "0",
                       "--units", "random", "--n-neurons", "1", "--steps", "1")
    assert code == 0 and "not applied" in out and "locality 1" not in out


@pytest.mark.parametrize("method, at", [("gradient", "noun"), ("gradient_image", "image")])
def test_the_gradient_baselines_pick_their_own_top_units(tiny_llava, case, method, at):
    """``units="gradient"`` / ``"gradient_image"`` edit the top units of that score summed over the
    edit images (checked against gradient_attributions called directly), not the contribution units."""
    from mmneurons_utils.interventions.edit_inputs import choose_units, source_steps
    from mmneurons_utils.method.scoring import gradient_attributions, top_units

    images = case["images"]
    captions = tiny_llava.describe(images, activation="down_proj_input")
    steps = source_steps(tiny_llava, captions, case["source"])
    source_id = captions[0].token_ids[steps[0]]
    chosen = choose_units(tiny_llava, captions, steps, source_id, 5, method, images=images)
    total = sum(gradient_attributions(tiny_llava, tiny_llava.inputs([image]), c.token_ids,
                                      [(s, source_id)], (at,))[at][0]
                for image, c, s in zip(images, captions, steps))
    assert chosen.tolist() == top_units(total, 5)[0].tolist()
    ours = choose_units(tiny_llava, captions, steps, source_id, 5, "contribution")
    assert set(map(tuple, chosen.tolist())) != set(map(tuple, ours.tolist()))
    with pytest.raises(EditInputError, match="needs the edit images"):
        choose_units(tiny_llava, captions, steps, source_id, 5, method)


def test_learning_the_deltas_leaves_the_model_exactly_as_found(tiny_llava, case):
    from mmneurons_utils.interventions.edit_inputs import source_steps, target_token
    from mmneurons_utils.interventions.edit_learning import EditConfig, learn_deltas

    captions = tiny_llava.describe(case["images"])
    steps = source_steps(tiny_llava, captions, case["source"])
    state = {k: v.clone() for k, v in tiny_llava.model.state_dict().items()}
    flags = [p.requires_grad for p in tiny_llava.model.parameters()]
    units = np.array([[3, 5], [2, 700]])
    learned = learn_deltas(tiny_llava, case["images"], captions, steps,
                           target_token(tiny_llava, case["target"]), units,
                           config=EditConfig(steps=4))
    assert learned.deltas.shape == (2, tiny_llava.down_proj(0).weight.shape[0])
    assert learned.deltas.abs().sum() > 0 and learned.steps == 4 and not learned.converged
    assert all(torch.equal(v, state[k]) for k, v in tiny_llava.model.state_dict().items())
    assert [p.requires_grad for p in tiny_llava.model.parameters()] == flags
    assert all(not tiny_llava.down_proj(l)._forward_hooks for l in range(tiny_llava.n_layers))


def test_the_failed_edit_rule_lives_in_the_report():
    from mmneurons_utils.interventions.editing import EditReport

    report = EditReport(converged=False, final_margin=-1.0, steps=3, n_neurons=2, unit_choice="given",
                        weight_norm=0.1, relative_norm=0.01, reliability_free=0.0)
    assert "generalization" not in report.as_dict()                   # not measured yet
    assert report.success == 0.0                                      # the alias reads the field
    report.not_applied(n_heldout=4, n_locality=6)
    m = report.as_dict()
    assert _isnan(m["generalization"]) and _isnan(m["locality"]) and _isnan(m["locality_kl"])
    assert _isnan(m["m_generality_free"]) and _isnan(m["m_locality"]) and m["reliability"] == 0.0
    assert m["n_heldout"] == 4 and m["n_locality"] == 6 and m["applied"] is False
    assert m["accepted"] is False
    assert list(m)[:7] == ["converged", "final_margin", "steps", "n_neurons", "unit_choice",
                           "weight_norm", "relative_norm"]
    with pytest.raises(KeyError, match="no field"):
        report.update(sucess=1.0)


def test_edit_settings_are_one_config():
    from mmneurons_utils.interventions.edit_learning import EditConfig

    assert EditConfig.of(None, k=3).k == 3 and EditConfig.of(EditConfig(steps=9), lr=0.1).steps == 9
    with pytest.raises(EditInputError, match="unknown edit setting"):
        EditConfig.of(None, n_steps=3)
    with pytest.raises(EditInputError, match="k must be an integer"):
        EditConfig(k=0)
