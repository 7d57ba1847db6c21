"""The CLI's commands on smol-llava (the pretrained SmolLM2 inside): find, perturb and edit end to
end on two or three scenes, each checked on what it says, not only that it ran."""

import json

import pandas as pd
import pytest

pytestmark = pytest.mark.slow   # the slow tier: every test here takes seconds to minutes


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_find_on_the_pretrained_model(cli, tmp_path):
    out_file = tmp_path / "smol.parquet"
    code, out, err = cli("find", "--model", "smol-llava", "--scenes", "2", "--seed", "0", "--top-k", "5",
                         "--out", str(out_file), "--json")
    assert code == 0, err
    table = pd.read_parquet(out_file)
    assert set(table.model) == {"smol-llava"} and table.layer.between(0, 29).all()
    assert (table.groupby(["image_id", "noun"]).size() == 5).all() and table.caption.str.contains(" ").all()
    assert table.unit.between(0, 1535).all() and set(table.polarity) <= {-1, 1}


def test_perturb_on_the_pretrained_model_top_units_beat_random(cli):
    code, out, err = cli("perturb", "--model", "smol-llava", "--scenes", "2", "--seed", "0",
                         "--k", "50", "--zero", "--n-random", "1", "--json")
    assert code == 0, err
    r = _last_json(out)
    assert r["margin_drop_top"] > r["margin_drop_random"] + 1.0


def test_edit_on_the_pretrained_model_reports_its_keys(cli):
    code, out, err = cli("edit", "--model", "smol-llava", "--source", "dog", "--target", "cat",
                         "--scenes", "24", "--seed", "0", "--steps", "40", "--json")
    assert code == 0, err
    r = _last_json(out)
    assert r["method"] == "contribution" and r["params_changed"] == 5 * 576    # 5 write vectors of D
    assert {"reliability", "m_locality", "t_locality", "decoupling"} <= set(r)
