"""The paper-claims scorecard on hand-made tables (written the way the notebooks write them)."""

import json
import math

import pandas as pd
import pytest

from mmneurons_utils.scorecard import claims
from mmneurons_utils.scorecard.claims import (CLAIMS, FAILS, HOLDS, NOT_MEASURED, PARTLY, scorecard,
                                              to_markdown, wilson_interval, write_scorecard)
from mmneurons_utils.companion.tables import save_table

METHODS = ("contribution", "gradient", "gradient_image", "random")


def summary(values: dict, models=("m1", "m2")) -> pd.DataFrame:
    """A ``summarize_ci`` long table: ``values[method][metric] = (mean, low, high)``."""
    rows = []
    for model in models:
        for method, metrics in values.items():
            for metric, (mean, low, high) in metrics.items():
                n = 0 if math.isnan(mean) else 40
                rows.append(dict(model=model, method=method, metric=metric, mean=mean, low=low,
                                 high=high, n=n, n_clusters=n // 2))
    return pd.DataFrame(rows)


def good_tables() -> dict:
    """Tables on which every claim holds for model m1 (02/03 also for m2; 04/05 run m1)."""
    return {
        "00_model_summary": pd.Series({"family": "llava", "decoder layers": 4}, name="m1").to_frame(),
        "01_layer_distribution": pd.DataFrame({"m1": [0.05, 0.05, 0.1, 0.8],
                                               "m2": [0.1, 0.1, 0.2, 0.6]}).rename_axis("layer"),
        "01_speed": pd.Series({"overhead_ratio": 1.05, "gradient_speedup": 50.0,
                               "gradient_image_speedup": 55.0, "contribution_ms_per_noun": 0.2,
                               "gradient_ms_per_noun": 10.0, "gradient_image_ms_per_noun": 11.0,
                               "n_nouns": 20.0}).to_frame("m1"),
        "02_noun_hits_summary": summary({
            m: {"noun_hit": hit, "noun_rank": rank, "chance": (0.13, 0.13, 0.13)}
            for m, hit, rank in [("contribution", (0.9, 0.85, 0.95), (2.0, 1.5, 2.5)),
                                 ("gradient", (0.6, 0.55, 0.65), (7.0, 6.0, 8.0)),
                                 ("gradient_image", (0.2, 0.15, 0.25), (30.0, 28.0, 32.0)),
                                 ("random", (0.2, 0.15, 0.25), (33.0, 31.0, 35.0)),
                                 ("selection_null", (0.6, 0.55, 0.65), (6.0, 5.0, 7.0))]}),
        "02_specificity_summary": summary({
            m: {"mass_in_box": mass, "mass_in_box_centred": mass, "box_share": (0.2, 0.18, 0.22),
                "auroc": auc}
            for m, mass, auc in [("contribution", (0.4, 0.35, 0.45), (0.8, 0.78, 0.82)),
                                 ("gradient", (0.35, 0.3, 0.4), (0.77, 0.75, 0.79)),
                                 ("gradient_image", (0.3, 0.26, 0.34), (0.62, 0.6, 0.64)),
                                 ("random", (0.25, 0.21, 0.29), (0.52, 0.51, 0.54)),
                                 ("selection_null", (0.27, 0.23, 0.31), (0.55, 0.53, 0.57))]}),
        "03_region_summary": summary({
            m: {"retained": r, "noun_kept": (0.8, 0.6, 1.0), "caption_same": (0.1, 0.0, 0.2)}
            for m, r in [("contribution", (0.62, 0.52, 0.71)), ("gradient", (0.33, 0.25, 0.4)),
                         ("gradient_image", (0.19, 0.12, 0.25)), ("random", (0.007, 0.0, 0.02))]}),
        "03_cross_image_summary": summary({
            m: {"jaccard_same": same, "jaccard_different": diff, "top_unit_share": (0.9, 0.85, 0.95)}
            for m, same, diff in [("contribution", (0.5, 0.45, 0.55), (0.02, 0.018, 0.022)),
                                  ("gradient", (0.25, 0.2, 0.3), (0.014, 0.013, 0.015)),
                                  ("gradient_image", (0.14, 0.12, 0.17), (0.04, 0.04, 0.05)),
                                  ("random", (0.001, 0.0005, 0.002), (0.002, 0.0017, 0.0019))]}),
        "04_curves_over_k": pd.DataFrame([
            dict(perturbation="zero", method=m, k=k, margin=6 - d, margin_drop=d, prob_drop=0.1,
                 noun_removed=r, caption_changed=r, n=40)
            for m, rows in [("contribution", [(1, 0.3, 0.0), (50, 4.0, 0.3), (200, 5.6, 0.6),
                                              (1000, 7.0, 0.7)]),
                            ("gradient", [(1, 0.5, 0.0), (50, 4.7, 0.25), (200, 6.6, 0.4),
                                          (1000, 8.0, 0.6)]),
                            ("random", [(1, 0.01, 0.0), (50, 0.03, 0.0), (200, 0.02, 0.01),
                                        (1000, 0.9, 0.03)])]
            for k, d, r in rows]),
        "05_edit_summary": pd.DataFrame([
            dict(units=u, n_neurons=n, n_pairs=20, n_applied=a, success=s, generalization=0.7,
                 locality=loc, locality_kl=0.002, converged=s, steps=40.0, weight_norm=3.0,
                 relative_norm=2.0, n_excluded_target=0)
            for u, n, a, s, loc in [("contribution", 1, 3, 0.15, 0.93),
                                    ("contribution", 5, 18, 0.9, 0.98),
                                    ("contribution", 20, 20, 1.0, 0.99),
                                    ("gradient", 5, 18, 0.88, 0.99),
                                    ("gradient_image", 5, 11, 0.53, 0.77),
                                    ("random", 5, 0, 0.0, math.nan)]]),
        "05_editors_summary": editors_summary({"contribution": (0.95, 0.80, 0.97),
                                               "ft": (1.0, 0.85, 0.90), "lora": (0.97, 0.80, 0.95),
                                               "rome": (0.85, 0.20, 1.0), "random": (0.05, math.nan, math.nan)}),
    }


def editors_summary(values: dict, models=("m1", "m2"), half_width=0.05) -> pd.DataFrame:
    """A ``summarize_editors`` table per model: ``values[method] = (success, m_generality,
    m_locality)``, every interval ± ``half_width``; ``contribution`` and ``random`` at k = 5."""
    rows = []
    for model in models:
        for method, means in values.items():
            row = dict(model=model, method=method, k=5, n_pairs=20)
            for axis, mean in zip(("success", "m_generality", "m_locality"), means):
                row.update({axis: mean, f"{axis}_low": mean - half_width, f"{axis}_high": mean + half_width})
            rows.append(row)
    return pd.DataFrame(rows)


def set_editor(method, axis, mean):
    def change(frame):
        frame = frame.copy()
        rows = frame["method"] == method
        frame.loc[rows, [axis, f"{axis}_low", f"{axis}_high"]] = (mean, mean - 0.05, mean + 0.05)
        return frame
    return change


def write(tmp_path, tables: dict):
    for name, frame in tables.items():
        if frame is not None:
            save_table(frame, tmp_path, name)        # as Outputs.table writes them
    return tmp_path / "tables"


def verdicts(card: pd.DataFrame, model="m1") -> dict:
    rows = card[card["model"] == model]
    return dict(zip(rows["claim_id"], rows["verdict"]))


def card_with(tmp_path, **changes) -> pd.DataFrame:
    tables = good_tables()
    for name, change in changes.items():
        tables[name] = change(tables[name]) if callable(change) else change
    return scorecard(write(tmp_path, tables))


def set_summary(method, metric, value, model=None):
    """A change of one (method, metric) row of a summary table to ``value = (mean, low, high)``."""
    def change(frame):
        frame = frame.copy()
        rows = (frame["method"] == method) & (frame["metric"] == metric)
        if model is not None:
            rows &= frame["model"] == model
        frame.loc[rows, ["mean", "low", "high"]] = value
        return frame
    return change


# --- the declarations -------------------------------------------------------------
def test_every_claim_carries_its_rule_as_text_and_function():
    assert [c.id for c in CLAIMS] == ["layers", "sensitivity", "specificity", "region_invariance",
                                      "cross_image_invariance", "causal_effect", "editing",
                                      "editing_vs_editors", "efficiency"]
    for claim in CLAIMS:
        assert claim.rule.startswith("holds if") and "does not hold" in claim.rule
        assert claim.section.startswith("§") and claim.source.endswith(".csv")
        assert callable(claim.judge) and callable(claim.measure)
    assert "0.6" in CLAIMS[0].rule and "2 × random" in CLAIMS[1].rule


def test_wilson_interval():
    low, high = wilson_interval(4, 4)
    assert low == pytest.approx(0.510, abs=1e-3) and high == 1.0
    low, high = wilson_interval(0, 4)
    assert low == 0.0 and high == pytest.approx(0.490, abs=1e-3)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


# --- holds ------------------------------------------------------------------------
def test_every_claim_holds_on_good_tables(tmp_path):
    card = card_with(tmp_path)
    assert verdicts(card, "m1") == {c.id: HOLDS for c in CLAIMS}
    # m2 is only in the two-model tables; 04, 05 and 01_speed ran m1 (00_model_summary says so)
    m2 = verdicts(card, "m2")
    assert [m2[c] for c in ("causal_effect", "editing", "efficiency")] == [NOT_MEASURED] * 3
    assert all(m2[c] == HOLDS for c in ("layers", "sensitivity", "specificity", "region_invariance",
                                        "cross_image_invariance", "editing_vs_editors"))
    row = card[(card["model"] == "m1") & (card["claim_id"] == "sensitivity")].iloc[0]
    assert (row["ours"], row["ours_low"], row["ours_high"]) == (0.9, 0.85, 0.95)
    assert (row["gradient"], row["gradient_image"], row["random"], row["n"]) == (0.6, 0.2, 0.2, 40)
    assert row["source"] == "02_noun_hits_summary.csv"
    layers = card[(card["model"] == "m2") & (card["claim_id"] == "layers")].iloc[0]
    assert layers["ours"] == pytest.approx(0.8)                 # layers 2 and 3 of 4
    causal = card[(card["model"] == "m1") & (card["claim_id"] == "causal_effect")].iloc[0]
    assert causal["ours"] == 5.6 and "k = 200" in causal["metric"]      # largest k ≤ 200, not 1000
    edit = card[(card["model"] == "m1") & (card["claim_id"] == "editing")].iloc[0]
    assert edit["ours"] == 0.9 and edit["random"] == 0.0 and edit["n"] == 20   # the 5-unit rows
    assert edit["ours_low"] == pytest.approx(wilson_interval(18, 20)[0])
    field = card[(card["model"] == "m1") & (card["claim_id"] == "editing_vs_editors")].iloc[0]
    # strongest by the mean of the three axes: ft (0.917) over lora (0.907) and rome (0.683)
    assert field["ours"] == 0.95 and field["random"] == 0.05 and "strongest: ft" in field["detail"]


# --- partly / does not hold, one claim at a time ---------------------------------------
@pytest.mark.parametrize("claim, changes, expected", [
    ("layers", {"01_layer_distribution": pd.DataFrame({"m1": [0.2, 0.25, 0.3, 0.25]})}, PARTLY),
    ("layers", {"01_layer_distribution": pd.DataFrame({"m1": [0.5, 0.3, 0.1, 0.1]})}, FAILS),
    # separated from the null, but less than 2 × random (random can score: chance 0.13)
    ("sensitivity", {"02_noun_hits_summary": set_summary("random", "noun_hit", (0.5, 0.45, 0.55))},
     PARTLY),
    # above the selection-matched null's point estimate, intervals overlapping
    ("sensitivity", {"02_noun_hits_summary": set_summary("contribution", "noun_hit", (0.7, 0.62, 0.78))},
     PARTLY),
    # above random by far, but below the selection-matched null
    ("sensitivity", {"02_noun_hits_summary": set_summary("contribution", "noun_hit", (0.5, 0.45, 0.55))},
     FAILS),
    # no interval in the table: the interval condition fails
    ("sensitivity", {"02_noun_hits_summary": set_summary("contribution", "noun_hit",
                                                         (0.9, math.nan, math.nan))}, PARTLY),
    ("sensitivity", {"02_noun_hits_summary": set_summary("contribution", "noun_hit", (0.1, 0.05, 0.15))},
     FAILS),
    # above the box's share and random, but less than 1.5 × the share
    ("specificity", {"02_specificity_summary": set_summary("contribution", "mass_in_box_centred", (0.28, 0.27, 0.29))},
     PARTLY),
    ("specificity", {"02_specificity_summary": set_summary("contribution", "auroc", (0.5, 0.48, 0.52))},
     FAILS),
    ("specificity", {"02_specificity_summary": set_summary("contribution", "mass_in_box_centred", (0.15, 0.1, 0.2))},
     FAILS),
    ("region_invariance", {"03_region_summary": set_summary("contribution", "retained", (0.4, 0.3, 0.5))},
     PARTLY),
    ("region_invariance", {"03_region_summary": set_summary("contribution", "retained", (0.0, 0.0, 0.0))},
     FAILS),
    ("cross_image_invariance",
     {"03_cross_image_summary": set_summary("contribution", "jaccard_same", (0.15, 0.1, 0.2))}, PARTLY),
    ("cross_image_invariance",
     {"03_cross_image_summary": set_summary("contribution", "jaccard_same", (0.01, 0.005, 0.015))}, FAILS),
    # the margin drops, but fewer than half of the nouns leave the caption at k = 200
    ("causal_effect", {"04_curves_over_k": lambda f: f.assign(noun_removed=f["noun_removed"].where(
        ~((f["method"] == "contribution") & (f["k"] == 200)), 0.35))}, PARTLY),
    ("causal_effect", {"04_curves_over_k": lambda f: f.assign(margin_drop=f["margin_drop"].where(
        f["method"] != "contribution", 0.0))}, FAILS),
    ("editing", {"05_edit_summary": lambda f: f.assign(success=f["success"].where(
        ~((f["units"] == "contribution") & (f["n_neurons"] == 5)), 0.6))}, PARTLY),
    ("editing", {"05_edit_summary": lambda f: f.assign(locality=f["locality"].where(
        ~((f["units"] == "contribution") & (f["n_neurons"] == 5)), 0.9))}, PARTLY),
    ("editing", {"05_edit_summary": lambda f: f.assign(success=f["success"].where(
        ~((f["units"] == "contribution") & (f["n_neurons"] == 5)), 0.0))}, FAILS),
    # behind ft on generality (intervals separate) but level on success: partly
    ("editing_vs_editors", {"05_editors_summary": set_editor("contribution", "m_generality", 0.6)}, PARTLY),
    # behind the strongest on every axis
    ("editing_vs_editors", {"05_editors_summary": lambda f: set_editor("contribution", "m_locality", 0.5)(
        set_editor("contribution", "m_generality", 0.5)(set_editor("contribution", "success", 0.7)(f)))},
     FAILS),
    # the strongest is chosen by the mean of the axes: with ROME's generality at 0.95 it is ROME,
    # whose locality interval (1.0 ± 0.05) lies above ours (0.85): partly
    ("editing_vs_editors", {"05_editors_summary": lambda f: set_editor("contribution", "m_locality", 0.85)(
        set_editor("rome", "m_generality", 0.95)(f))}, PARTLY),
    ("efficiency", {"01_speed": lambda f: f.assign(m1=f["m1"].where(f.index != "overhead_ratio", 1.3))},
     PARTLY),
    ("efficiency", {"01_speed": lambda f: f.assign(m1=f["m1"].where(f.index != "gradient_speedup", 0.5))},
     FAILS),
])
def test_rules_give_partly_and_does_not_hold(tmp_path, claim, changes, expected):
    got = verdicts(card_with(tmp_path, **changes))
    assert got[claim] == expected
    assert all(v == HOLDS for c, v in got.items() if c != claim)     # the others are untouched


def test_specificity_without_patch_grid_is_judged_on_auroc(tmp_path):
    nan = (math.nan, math.nan, math.nan)
    def no_grid(frame):
        for method in METHODS + ("selection_null",):
            for metric in ("mass_in_box", "mass_in_box_centred", "box_share"):
                frame = set_summary(method, metric, nan, model="m2")(frame)
        return frame
    card = card_with(tmp_path, **{"02_specificity_summary": no_grid})
    row = card[(card["model"] == "m2") & (card["claim_id"] == "specificity")].iloc[0]
    assert row["verdict"] == HOLDS and row["ours"] == 0.8 and "AUROC" in row["metric"]
    card = card_with(tmp_path, **{"02_specificity_summary": lambda f: set_summary(
        "contribution", "auroc", (0.6, 0.5, 0.7), model="m2")(no_grid(f))})
    assert verdicts(card, "m2")["specificity"] == PARTLY


# --- not measured ------------------------------------------------------------------
def test_missing_table_is_not_measured_with_the_reason(tmp_path):
    card = card_with(tmp_path, **{"04_curves_over_k": None, "02_noun_hits_summary": None})
    got = verdicts(card)
    assert got["causal_effect"] == NOT_MEASURED and got["sensitivity"] == NOT_MEASURED
    row = card[(card["model"] == "m1") & (card["claim_id"] == "causal_effect")].iloc[0]
    assert "04_curves_over_k.csv not found" in row["detail"] and math.isnan(row["ours"])
    assert all(math.isnan(row[b]) for b in ("gradient", "gradient_image", "random"))
    assert sum(v == HOLDS for v in got.values()) == len(CLAIMS) - 2


def test_unusable_table_or_missing_baseline_is_not_measured(tmp_path):
    card = card_with(tmp_path, **{
        "05_edit_summary": lambda f: f.drop(columns="locality"),
        "03_region_summary": lambda f: f[f["method"] != "random"],
        "01_speed": lambda f: f.drop(index="gradient_speedup")})
    got = verdicts(card)
    assert got["editing"] == got["region_invariance"] == got["efficiency"] == NOT_MEASURED
    details = dict(zip(card["claim_id"], card["detail"]))
    assert "locality" in details["editing"] and "gradient_speedup" in details["efficiency"]


def test_empty_folder_gives_a_card_of_not_measured(tmp_path):
    (tmp_path / "tables").mkdir()
    card = scorecard(tmp_path / "tables", model="x")
    assert len(card) == len(CLAIMS) and set(card["verdict"]) == {NOT_MEASURED}
    assert card["ours"].isna().all() and (card["model"] == "x").all()


# --- which model a single-model table is about ---------------------------------------
def test_single_model_tables_take_the_executed_notebooks_model(tmp_path):
    tables = write(tmp_path, good_tables())
    (tmp_path / "notebooks").mkdir()
    for name in ("04_causal_ablation", "05_editing"):
        (tmp_path / "notebooks" / f"{name}.ipynb").write_text(json.dumps(
            {"cells": [], "metadata": {"papermill": {"parameters": {"model": "m2"}}}}))
    card = scorecard(tables)
    assert verdicts(card, "m2")["causal_effect"] == HOLDS and verdicts(card, "m2")["editing"] == HOLDS
    assert verdicts(card, "m1")["causal_effect"] == NOT_MEASURED
    only = scorecard(tables, model="m2")
    assert set(only["model"]) == {"m2"} and len(only) == len(CLAIMS)


def test_a_default_run_takes_the_model_from_the_notebooks_parameters_cell(tmp_path):
    tables = write(tmp_path, good_tables())
    (tmp_path / "notebooks").mkdir()
    for name in ("04_causal_ablation", "05_editing"):     # papermill got no -p model: the default
        cells = [{"cell_type": "code", "metadata": {"tags": ["parameters"]},
                  "source": ['# Parameters\n', 'model = "m2"   # the default\n', 'seed = 0\n']},
                 {"cell_type": "code", "metadata": {"tags": ["injected-parameters"]},
                  "source": ['output_dir = "/tmp/x"\n']}]
        (tmp_path / "notebooks" / f"{name}.ipynb").write_text(json.dumps(
            {"cells": cells, "metadata": {"papermill": {"parameters": {"output_dir": "/tmp/x"}}}}))
    card = scorecard(tables)
    assert verdicts(card, "m2")["causal_effect"] == HOLDS and verdicts(card, "m2")["editing"] == HOLDS


def test_tables_without_a_model_column_use_the_notebooks_model(tmp_path):
    tables = good_tables()
    tables["02_noun_hits_summary"] = tables["02_noun_hits_summary"].query("model == 'm1'").drop(
        columns="model")
    del tables["00_model_summary"], tables["01_speed"]
    card = scorecard(write(tmp_path, tables), model="m1")
    assert verdicts(card)["sensitivity"] == HOLDS and verdicts(card)["causal_effect"] == HOLDS


# --- the files --------------------------------------------------------------------
def test_markdown_has_one_row_per_claim_and_the_rules(tmp_path):
    card = card_with(tmp_path)
    text = to_markdown(card)
    for model in ("m1", "m2"):
        section = text.split(f"## {model}\n")[1].split("\n## ")[0]
        rows = [line for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
        assert len(rows) == len(CLAIMS)
        assert [r.split(" | ")[1] for r in rows] == [c.claim for c in CLAIMS]
    for claim in CLAIMS:
        assert claim.rule in text
    assert "0.900 [0.850, 0.950]" in text


def test_write_scorecard_writes_csv_and_markdown_atomically(tmp_path):
    write(tmp_path, good_tables())
    csv_path, md_path = write_scorecard(tmp_path)
    assert (csv_path, md_path) == (tmp_path / "claims.csv", tmp_path / "claims.md")
    back = pd.read_csv(csv_path)
    assert list(back.columns) == claims.COLUMNS and len(back) == 2 * len(CLAIMS)
    assert md_path.read_text().startswith("# Paper claims")
    assert not list(tmp_path.glob(".claims*"))                  # no temporary files left


def test_the_runner_writes_the_scorecard_after_the_notebooks(tmp_path, monkeypatch):
    from mmneurons_utils.companion import run_notebooks

    def fake_run_all(notebooks, out, parameters, only=None, kernel_name=None):
        write(out, good_tables())
        return {"total": 0.0}

    monkeypatch.setattr(run_notebooks, "run_all", fake_run_all)
    run_notebooks.main(["--notebooks", str(tmp_path), "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "claims.md").is_file() and (tmp_path / "run" / "claims.csv").is_file()


# --- baselines that cannot be beaten: a 49k vocabulary -----------------------------
def _large_vocabulary(hit, null, random=(0.0, 0.0, 0.0)):
    def change(frame):
        for method, value in (("contribution", hit), ("selection_null", null), ("random", random)):
            frame = set_summary(method, "noun_hit", value)(frame)
        for method in METHODS + ("selection_null",):
            frame = set_summary(method, "chance", (0.0002, 0.0002, 0.0002))(frame)
        return frame
    return change


@pytest.mark.parametrize("hit, null, expected", [
    ((0.011, 0.002, 0.022), (0.003, 0.0, 0.008), PARTLY),     # beats the null's point, intervals overlap
    ((0.05, 0.03, 0.07), (0.003, 0.0, 0.008), HOLDS),         # separated from the null; random not needed
    ((0.002, 0.0, 0.006), (0.003, 0.0, 0.008), FAILS),        # random 0 by construction does not rescue it
])
def test_sensitivity_is_judged_against_the_null_where_random_cannot_score(tmp_path, hit, null, expected):
    card = card_with(tmp_path, **{"02_noun_hits_summary": _large_vocabulary(hit, null)})
    assert verdicts(card)["sensitivity"] == expected
    row = card[(card["model"] == "m1") & (card["claim_id"] == "sensitivity")].iloc[0]
    assert "selection-matched null" in row["null"] and row["selection_null"] == null[0]


def test_sensitivity_needs_a_better_noun_rank_than_the_null(tmp_path):
    # separated hit intervals, but the noun ranks lower in ours' lenses than in the null's (smol-llava)
    worse_rank = lambda f: set_summary("contribution", "noun_rank", (8.0, 7.0, 9.0))(f)
    card = card_with(tmp_path, **{"02_noun_hits_summary": worse_rank})
    assert verdicts(card)["sensitivity"] == PARTLY


def test_sensitivity_without_a_null_is_not_measured(tmp_path):
    drop = lambda f: f[f["method"] != "selection_null"]
    card = card_with(tmp_path, **{"02_noun_hits_summary": drop})
    assert verdicts(card)["sensitivity"] == NOT_MEASURED


def test_specificity_reads_the_centred_maps_and_names_them(tmp_path):
    # raw maps at chance (a flat offset) do not matter: the median-centred maps are judged
    flat = lambda f: set_summary("contribution", "mass_in_box", (0.2, 0.19, 0.21))(f)
    card = card_with(tmp_path, **{"02_specificity_summary": flat})
    row = card[(card["model"] == "m1") & (card["claim_id"] == "specificity")].iloc[0]
    assert row["verdict"] == HOLDS and "median-centred" in row["metric"] and "raw maps" in row["detail"]
    # ... and it must beat the selection-matched null too
    card = card_with(tmp_path, **{"02_specificity_summary": set_summary(
        "selection_null", "mass_in_box_centred", (0.42, 0.40, 0.44))})
    assert verdicts(card)["specificity"] == FAILS
    # only raw maps (an old table): not judged, with the reason
    only_raw = lambda f: f[f["metric"] != "mass_in_box_centred"]
    card = card_with(tmp_path, **{"02_specificity_summary": only_raw})
    row = card[(card["model"] == "m1") & (card["claim_id"] == "specificity")].iloc[0]
    assert row["verdict"] == NOT_MEASURED and "median-centred" in row["detail"]


def test_a_model_with_a_committed_card_points_at_it(tmp_path):
    card = card_with(tmp_path)
    text = to_markdown(card.assign(model=card["model"].map({"m1": "smol-llava", "m2": "m2"})))
    smol = text.split("## smol-llava\n")[1].split("\n## ")[0]
    assert "`results/scorecards/smol-llava.md`" in smol
    assert (claims.COMMITTED_CARDS / "smol-llava.md").is_file()
    assert "results/scorecards" not in text.split("## m2\n")[1]        # no card committed for m2


def test_models_of_different_depths_are_each_judged_on_their_own_layers(tmp_path):
    deep = [0.0] * 28 + [0.25, 0.75]                   # a 30-layer model: everything in the last two
    shallow = [0.6, 0.2, 0.1, 0.1]                     # a 4-layer model: mostly in the lower half
    frame = pd.DataFrame({"deep": pd.Series(deep), "shallow": pd.Series(shallow)}).rename_axis("layer")
    card = card_with(tmp_path, **{"01_layer_distribution": frame})
    rows = card[card.claim_id == "layers"].set_index("model")
    assert rows.loc["deep", "verdict"] == HOLDS and "of 30" in rows.loc["deep", "detail"]
    assert rows.loc["shallow", "verdict"] == FAILS and "of 4" in rows.loc["shallow", "detail"]
    assert rows.loc["shallow", "ours"] == pytest.approx(0.2)
