"""The editors compared on the same request (#22): each baseline makes the target win on its
edit images and undo() restores the weights bit for bit (and the module tree: no adapter left);
ROME's update is rank one along C⁻¹k* with k* recomputed independently; the metrics are 1 for
the identity and t_locality drops when text-relevant units are scaled; the CLI's JSON has the
keys for every editor."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mmneurons_utils import make_scenes
from mmneurons_utils.batch.edit_evaluation import ImagePool
from mmneurons_utils.batch.editor_comparison import JSON_KEYS, evaluate_editor, summarize_editors
from mmneurons_utils.interventions.ablation import perturb_units
from mmneurons_utils.interventions.edit_learning import EditInputError
from mmneurons_utils.interventions.editors import EDITORS, edit_with
from mmneurons_utils.interventions.layer_editors import key_covariance
from mmneurons_utils.model.trace import trace_down_proj
from mmneurons_utils.properties.edit_metrics import (METRIC_KEYS, TEXT_PROMPTS, _prompt_ids, _text_decoder,
                                                     clean_reference, edit_metrics, forced_argmax)

pytestmark = pytest.mark.slow   # the slow tier: every test here takes seconds to minutes


def _state(vlm):
    return {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}


def _same_state(vlm, state) -> bool:
    current = vlm.model.state_dict()
    return set(current) == set(state) and all(torch.equal(current[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def pool(tiny_llava):
    return ImagePool.build(tiny_llava, [s.image for s in make_scenes(80, seed=3)])


@pytest.fixture(scope="module")
def case(tiny_llava, pool):
    source = next(n for n in pool.nouns() if len(pool.with_noun(n)) >= 4)
    target = "cat" if source != "cat" else "dog"
    parts = pool.split(source, 2, 4, 6, target=target)
    pick = lambda key: [pool.images[i] for i in parts[key]]
    return dict(source=source, target=target, target_id=tiny_llava.tokenizer.convert_tokens_to_ids(target),
                images=pick("edit"), heldout=pick("heldout")[:3], unrelated=pick("unrelated"),
                locality=pick("locality"), covariance=pool.images[:48])


@pytest.mark.parametrize("method", ["ft", "lora", "rome"])
def test_baseline_makes_the_target_win_and_undo_restores_bit_for_bit(tiny_llava, case, method):
    vlm = tiny_llava
    state, modules = _state(vlm), [type(m).__name__ for m in vlm.model.modules()]
    flags = [p.requires_grad for p in vlm.model.parameters()]
    clean = vlm.describe(case["images"])
    edit = edit_with(vlm, case["images"], case["source"], case["target"], method,
                     unrelated=case["unrelated"], covariance_images=case["covariance"], k=5)
    assert edit.converged and edit.applied and edit.layer is not None
    # the target wins at the source step of every edit image, teacher-forcing the clean caption
    steps = [c.token_ids.index(vlm.tokenizer.convert_tokens_to_ids(case["source"])) for c in clean]
    top = forced_argmax(vlm, case["images"], [c.token_ids for c in clean])
    assert [int(t[s]) for t, s in zip(top, steps)] == [case["target_id"]] * len(clean)
    # only the edit layer's down_proj changed, every entry of it (dense or rank one)
    changed = [k for k, v in vlm.model.state_dict().items() if not torch.equal(v, state[k])]
    assert len(changed) == 1 and changed[0].endswith(f"layers.{edit.layer}.mlp.down_proj.weight")
    d_model, d_ff = state[changed[0]].shape
    assert edit.params_changed == int((vlm.model.state_dict()[changed[0]] != state[changed[0]]).sum())
    assert edit.params_trained == {"ft": d_model * d_ff, "lora": 4 * (d_model + d_ff), "rome": d_model}[method]
    edit.undo()
    assert _same_state(vlm, state)
    assert [type(m).__name__ for m in vlm.model.modules()] == modules     # no adapter left behind
    assert [p.requires_grad for p in vlm.model.parameters()] == flags
    assert [c.text for c in vlm.describe(case["images"])] == [c.text for c in clean]
    edit.apply()
    assert not _same_state(vlm, state)
    edit.undo()
    assert _same_state(vlm, state)


def test_rome_update_is_rank_one_along_inverse_covariance_key(tiny_llava, case):
    vlm = tiny_llava
    edit = edit_with(vlm, case["images"], case["source"], case["target"], "rome",
                     unrelated=case["unrelated"], covariance_images=case["covariance"], k=5)
    edit.undo()
    delta = edit.deltas.T.double()                                   # (D, F)
    s = torch.linalg.svdvals(delta)
    assert s[1] / s[0] < 1e-5                                        # rank one
    # its row space is C⁻¹ k*, k* = the mean down_proj input at the source step (recomputed
    # from the generation-time activations, not the teacher-forced ones the editor used)
    caps = vlm.describe(case["images"], activation="down_proj_input")
    source_id = vlm.tokenizer.convert_tokens_to_ids(case["source"])
    key = torch.stack([c.activations.steps[c.token_ids.index(source_id), edit.layer] for c in caps]).mean(0)
    u = torch.linalg.solve(key_covariance(vlm, edit.layer, case["covariance"]).double(), key.double())
    right = torch.linalg.svd(delta)[2][0]
    assert abs(float(right @ u / u.norm())) > 0.999


def test_bad_method_is_a_one_line_error(tiny_llava, case):
    with pytest.raises(EditInputError, match="method must be one of contribution.*ft, lora, rome"):
        edit_with(tiny_llava, case["images"], case["source"], case["target"], "memit")
    with pytest.raises(EditInputError, match="rome needs covariance_images"):
        edit_with(tiny_llava, case["images"], case["source"], case["target"], "rome")


@torch.no_grad()
def _text_units(vlm, k: int) -> np.ndarray:
    """The ``k`` units with the largest mean |activation| over the text-only prompts."""
    total = torch.zeros(vlm.n_layers, vlm.d_ff)
    for prompt in TEXT_PROMPTS:
        x = torch.as_tensor([_prompt_ids(vlm, prompt)])
        with trace_down_proj(vlm, retain_input=True) as traces:
            _text_decoder(vlm)(input_ids=x)
        total += torch.stack([traces[l].input[0].abs().mean(0) for l in range(vlm.n_layers)])
    flat = total.flatten().topk(k).indices
    return torch.stack([flat // vlm.d_ff, flat % vlm.d_ff], 1).numpy()


def test_locality_is_one_for_the_identity_and_t_locality_drops_when_text_units_are_scaled(tiny_llava, case):
    vlm = tiny_llava
    ref = clean_reference(vlm, case["source"], case["target"], case["target_id"], case["images"],
                          case["heldout"], case["locality"])
    same = edit_metrics(vlm, ref)
    for key in ("m_locality", "m_locality_free", "t_locality", "t_locality_free", "no_image_locality"):
        assert same[key] == 1.0, key
    assert same["reliability"] == 0.0 and same["text_transfer"] == 0.0 and same["text_logit_gain"] == 0.0
    with perturb_units(vlm, _text_units(vlm, 10), mode="scale", factor=8.0):
        scaled = edit_metrics(vlm, ref)
    assert scaled["t_locality"] < 0.9
    assert edit_metrics(vlm, ref)["t_locality"] == 1.0               # restored


def test_evaluate_editor_scores_an_applied_edit_on_every_key(tiny_llava, pool, case):
    state = _state(tiny_llava)
    edit, row = evaluate_editor(tiny_llava, pool, case["source"], case["target"], "contribution", k=5,
                                n_covariance=48)
    assert _same_state(tiny_llava, state) and not edit.applied
    assert row["applied"] and row["success"] == row["reliability_free"]
    assert row["reliability"] == 1.0 and row["params_changed"] == 5 * tiny_llava.model.config.text_config.hidden_size
    for key in JSON_KEYS:
        assert key in row and row[key] == row[key], key               # present, not NaN
    summary = summarize_editors(__import__("pandas").DataFrame([row, {**row, "success": 0.0}]))
    assert summary.loc[0, "success"] == 0.5 and summary.loc[0, "success_low"] <= 0.5 <= summary.loc[0, "success_high"]


@pytest.mark.parametrize("method", EDITORS)
def test_cli_edit_json_has_the_keys_for_every_method(cli, method):
    code, out, _ = cli("edit", "--source", "dog", "--target", "cat", "--scenes", "40", "--seed", "0",
                       "--method", method, "--steps", "3", "--json")
    assert code == 0, out
    r = json.loads(out.strip().splitlines()[-1])
    for key in JSON_KEYS + ("success", "generalization", "locality", "locality_kl"):
        assert key in r, key
    assert r["method"] == method and isinstance(r["params_changed"], int)


def test_cli_edit_rejects_an_unknown_method(cli):
    code, out, err = cli("edit", "--source", "dog", "--target", "cat", "--scenes", "4", "--method", "memit")
    assert code == 2 and "--method must be one of" in err + out and "rome" in err + out


def test_comparison_csv_resumes_only_under_its_own_settings(tmp_path):
    """The comparison table records what made it: same settings resume (devices accumulate),
    other settings or a CSV with no record are refused, naming what differs."""
    from mmneurons_utils.batch.editor_comparison import check_settings, settings_path

    out = tmp_path / "table.csv"
    settings = dict(model="tiny-llava", weights="abc", scenes=120, steps=150)
    check_settings(out, settings, device="cpu")           # a new table: the record is written
    out.write_text("source,target\nbird,cat\n")
    check_settings(out, dict(settings), device="cuda:0")  # same settings: resumes
    assert json.loads(settings_path(out).read_text())["devices"] == ["cpu", "cuda:0"]
    with pytest.raises(EditInputError, match=r"steps 150 → 50"):
        check_settings(out, dict(settings, steps=50))
    settings_path(out).unlink()
    with pytest.raises(EditInputError, match="no settings record"):
        check_settings(out, settings)
    assert out.read_text() == "source,target\nbird,cat\n"   # refused: the rows are untouched


def test_comparison_cli_bad_flags_are_one_line_errors(tmp_path, cli):
    for flags, words in ((["--configs", "ft"], "method:k"), (["--configs", "sgd:5"], "unknown editor"),
                         (["--shard", "2/2"], "K/N")):
        code, _, err = cli("compare-editors", *flags, "--out", str(tmp_path / "t.csv"))
        assert code == 2
        assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())   # nothing written


def _rows(pairs, methods=(("contribution", 5), ("ft", 5), ("rome", 5))):
    """A comparison table of made-up rows: success 1 for ours and ft, ROME local but not general."""
    rows = []
    for i, (source, target) in enumerate(pairs):
        for method, k in methods:
            defaults = {key: 0.5 for key in ("generalization", "locality", "locality_kl", *METRIC_KEYS,
                                             "params_changed", "params_trained", "seconds", "steps")}
            rows.append(dict(defaults, source=source, target=target, method=method, k=k, applied=True,
                             success=1.0, m_generality=0.1 if method == "rome" else 0.8 + 0.01 * i,
                             m_locality=1.0 if method == "rome" else 0.7 + 0.01 * i))
    return pd.DataFrame(rows)


def test_summaries_use_complete_pairs_and_head_to_head_reads_intervals():
    from mmneurons_utils.batch import editor_comparison as ec

    pairs = [(f"s{i}", f"t{i}") for i in range(8)]
    table = pd.concat([_rows(pairs), _rows([("cut", "short")], (("contribution", 5),))])
    assert len(ec.complete_pairs(table)) == 24             # the pair with one editor is dropped
    summary = ec.summarize_by_model({"m": table}, n_resamples=200)
    assert set(summary.n_pairs) == {8} and list(summary.columns[:3]) == ["model", "method", "k"]
    duel = ec.head_to_head(summary, metrics=("success", "m_generality", "m_locality"))
    outcome = {(r.editor, r.metric): r.outcome for r in duel.itertuples()}
    assert outcome["rome", "m_generality"] == "ahead" and outcome["rome", "m_locality"] == "behind"
    assert outcome["ft", "m_generality"] == "level" and outcome["ft", "success"] == "level"


def test_load_comparison_refuses_tables_of_unknown_or_mixed_origin(tmp_path):
    from mmneurons_utils.batch.editor_comparison import check_settings, load_comparison

    out = tmp_path / "m.csv"
    _rows([("a", "b")]).to_csv(out, index=False)
    with pytest.raises(EditInputError, match="no settings record"):
        load_comparison(out)
    out.unlink()
    check_settings(out, dict(model="m"), device="cpu")
    pd.concat([_rows([("a", "b")])] * 2).to_csv(out, index=False)
    with pytest.raises(EditInputError, match="more than once"):
        load_comparison(out)
    _rows([("a", "b")]).to_csv(out, index=False)
    table, record = load_comparison(out)
    assert len(table) == 3 and record == dict(settings=dict(model="m"), devices=["cpu"])


def test_compare_editors_makes_each_pairs_clean_reference_once(tiny_llava, pool, case, monkeypatch):
    """One request (split, clean captions, clean reference) per pair, shared by its editors; the
    package's columns are the suite's free-running ones."""
    from mmneurons_utils.batch import editor_comparison as ec

    made = []
    real = ec.request

    def counted(vlm, pool, source, target, *args, **kwargs):
        made.append((source, target))
        return real(vlm, pool, source, target, *args, **kwargs)

    monkeypatch.setattr(ec, "request", counted)
    table = ec.compare_editors(tiny_llava, pool, [(case["source"], case["target"])],
                               [("contribution", 5), ("random", 5)], steps=3, n_covariance=8)
    assert made == [(case["source"], case["target"])] and len(table) == 2
    for alias, name in (("success", "reliability_free"), ("generalization", "m_generality_free"),
                        ("locality", "m_locality_free")):
        assert table[alias].equals(table[name]), alias
