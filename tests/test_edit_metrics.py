"""One edit-metrics suite and an Edit that holds weight state only (issue 27): undo() shows in the
report, the summary and the playground; learning the same edit twice is served from the cache
(identical deltas and report) and a changed setting or changed weights learn again; the clean
reference is captioned once per request and shared by its edits; the package's names are the
free-running metrics of the suite, and the metrics move the way an edit moves the model."""

import math

import numpy as np
import pytest
import torch

from mmneurons_utils import make_scenes
from mmneurons_utils.batch.edit_evaluation import ImagePool, edit_table, request, run_edit
from mmneurons_utils.interventions import edit_learning
from mmneurons_utils.interventions.edit_learning import EDIT_CACHE
from mmneurons_utils.interventions.editing import edit_token, evaluate_edit
from mmneurons_utils.properties.edit_metrics import ALIASES, clean_reference, edit_metrics


@pytest.fixture(scope="module")
def pool(tiny_llava):
    return ImagePool.build(tiny_llava, [s.image for s in make_scenes(40, seed=3)])


@pytest.fixture(scope="module")
def case(pool):
    source = next(n for n in pool.nouns() if len(pool.with_noun(n)) >= 3)
    target = "cat" if source != "cat" else "dog"
    said, without = pool.with_noun(source), pool.without_noun(source)
    return dict(source=source, target=target, images=[pool.images[i] for i in said[:1]],
                heldout=[pool.images[i] for i in said[1:3]],
                unrelated=[pool.images[i] for i in without[:2]],
                locality=[pool.images[i] for i in without[2:8]])


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (isinstance(v, float) and math.isnan(v) and math.isnan(b[k])) or v == b[k] for k, v in a.items())


def test_undo_is_reflected_in_the_report_the_summary_and_the_playground(tiny_llava, case):
    from mmneurons_utils.widgets import EditPlayground

    e = edit_token(tiny_llava, case["images"], case["source"], case["target"], k=5, steps=60,
                   unrelated=case["unrelated"])
    try:
        assert e.converged and e.applied and e.report.applied and e.report.accepted
        assert e.metrics["applied"] is True and e.summary()["applied"] is True
        play = EditPlayground(tiny_llava, make_scenes(1, seed=0))
        play.edit = e
        line, report = play.view()
        assert "(applied)" in line and report.iloc[:, 0]["applied"] == True  # noqa: E712
        e.undo()
        # one weight state, read live everywhere; the outcome (accepted, success) stays
        assert not e.applied and not e.report.applied and e.report.accepted
        assert e.metrics["applied"] is False and e.summary()["applied"] is False
        assert e.metrics["success"] == 1.0 and e.summary()["success"] == 1.0
        line, report = play.view()
        assert "(undone)" in line and report.iloc[:, 0]["applied"] == False  # noqa: E712
        with e:
            assert e.report.applied and play.view()[1].iloc[:, 0]["applied"] == True  # noqa: E712
        assert not e.report.applied
        # the outcome lives in the report only: the edit reads it, it has no copy to go stale
        assert e.converged is e.report.converged and e.steps == e.report.steps
        assert e.captions_after is e.report.captions_after
    finally:
        e.undo()


def test_the_same_edit_is_learned_once_and_a_changed_setting_learns_again(tiny_llava, case, monkeypatch):
    EDIT_CACHE.clear()
    request = dict(k=5, steps=60, unrelated=case["unrelated"], seed=0)
    first = edit_token(tiny_llava, case["images"], case["source"], case["target"], **request)
    first.undo()
    assert (EDIT_CACHE.misses, EDIT_CACHE.hits) == (1, 0)
    learned = first.deltas.clone()

    def no_training(*args, **kwargs):
        raise AssertionError("Adam ran again for a cached edit")

    monkeypatch.setattr(edit_learning, "_train", no_training)
    second = edit_token(tiny_llava, case["images"], case["source"], case["target"], **request)
    second.undo()
    assert EDIT_CACHE.hits == 1
    assert torch.equal(second.deltas, learned) and np.array_equal(second.units, first.units)
    assert _same(second.report.as_dict(), first.report.as_dict()) and second.history == first.history
    second.deltas.mul_(0)                       # what the cache hands out is a copy
    third = edit_token(tiny_llava, case["images"], case["source"], case["target"], **request)
    third.undo()
    assert torch.equal(third.deltas, learned)
    # any other setting, other units or other weights: learned again (here: refused)
    for changed in (dict(request, steps=61), dict(request, lr=1e-2), dict(request, k=4),
                    dict(request, unrelated=case["unrelated"][:1])):
        with pytest.raises(AssertionError, match="Adam ran again"):
            edit_token(tiny_llava, case["images"], case["source"], case["target"], **changed)
    from mmneurons_utils.interventions.ablation import perturb_units

    with perturb_units(tiny_llava, np.array([[0, 0]]), mode="scale", factor=1.001):   # other weights
        with pytest.raises(AssertionError, match="Adam ran again"):
            edit_token(tiny_llava, case["images"], case["source"], case["target"], **request)


def test_the_clean_reference_is_captioned_once_per_request(tiny_llava, pool, case, monkeypatch):
    pair = [(case["source"], case["target"])]
    calls = []
    generate = tiny_llava.model.generate

    def counted(*args, **kwargs):
        calls.append(kwargs.get("pixel_values", args[0] if args else None).shape[0])
        return generate(*args, **kwargs)

    monkeypatch.setattr(tiny_llava.model, "generate", counted)
    split = dict(n_edit=1, n_unrelated=2, n_locality=4)
    req = request(tiny_llava, pool, *pair[0], **split)
    n_request = len(calls)      # edit, unrelated, held-out and locality images, clean: once each
    assert n_request == 4
    calls.clear()
    table = edit_table(tiny_llava, pool, pair, configs=[("contribution", 5), ("contribution", 3)],
                       steps=60, **split)
    applied = int(table.applied.sum())
    assert applied >= 1 and (table.n_heldout > 0).all()
    # the request once for the pair (the clean captions, shared by both edits); per applied edit:
    # its edit, held-out and locality images edited, once each — never the clean ones again
    # (before the one suite: 7 per edit, 4 of them clean)
    assert len(calls) == n_request + 3 * applied, calls
    assert table.success.tolist() == table.reliability_free.tolist()
    assert table.locality.equals(table.m_locality_free) and table.generalization.equals(table.m_generality_free)
    assert len(req.reference.heldout_ids) == len(pool.split(case["source"], target=case["target"], **split)["heldout"])


def test_the_metrics_see_what_the_edit_does(tiny_llava, pool, case):
    """The identity scores perfect locality and no flip; a converged edit flips its images
    (teacher-forced and free-running) and keeps unrelated captions; undone, the model is clean."""
    vlm = tiny_llava
    target_id = vlm.tokenizer.convert_tokens_to_ids(case["target"])
    ref = clean_reference(vlm, case["source"], case["target"], target_id, case["images"],
                          case["heldout"], case["locality"], extended=False)
    clean = edit_metrics(vlm, ref)
    assert clean["reliability"] == 0.0 and clean["reliability_free"] == 0.0 == clean["success"]
    assert clean["m_locality"] == 1.0 == clean["locality"] and clean["locality_kl"] == 0.0
    for alias, name in ALIASES.items():
        assert _same({0: clean[alias]}, {0: clean[name]})
    e = edit_token(vlm, case["images"], case["source"], case["target"], k=5, steps=60,
                   unrelated=case["unrelated"])
    e.undo()
    edited = edit_metrics(vlm, ref, e)
    assert not e.applied                               # measured applied, left as found
    assert edited["reliability"] == 1.0 and edited["success"] == 1.0
    assert edited["locality_kl"] > 0 and edited["m_locality"] >= 0.9
    assert 0.0 <= edited["m_generality"] <= 1.0 and edited["n_heldout"] >= 1
    # the same through the edit's own entry point, which makes its reference itself
    out = evaluate_edit(e, case["heldout"], case["locality"])
    assert _same({k: out[k] for k in edited}, edited)
    assert edit_metrics(vlm, ref)["locality_kl"] == 0.0   # undone: clean again


def test_a_failed_edit_in_the_table_has_no_side_effects_but_a_zero_reliability(tiny_llava, pool, case):
    failed = run_edit(tiny_llava, pool, case["source"], case["target"], k=1, method="random",
                      steps=1, n_edit=1, n_unrelated=2, n_locality=4, seed=1)
    m = failed.metrics
    assert not m["accepted"] and not m["applied"] and m["reliability"] == 0.0 == m["success"]
    assert math.isnan(m["m_locality"]) and math.isnan(m["locality"]) and math.isnan(m["m_generality"])
