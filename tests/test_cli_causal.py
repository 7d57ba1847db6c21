import json
import re

import pytest


def test_perturb_json(cli):
    code, out, _ = cli("perturb", "--model", "tiny-llava", "--scenes", "4", "--seed", "0",
                       "--k", "50", "--zero", "--n-random", "2", "--json")
    assert code == 0
    r = json.loads(out.strip().splitlines()[-1])
    assert {"margin_drop_top", "margin_drop_random", "noun_removed_top", "noun_removed_random"} <= set(r)
    assert 0 <= r["noun_removed_top"] <= 1 and 0 <= r["noun_removed_random"] <= 1
    assert r["margin_drop_top"] > r["margin_drop_random"]


def test_perturb_noise(cli):
    code, out, _ = cli("perturb", "--scenes", "2", "--k", "10", "--sigma", "2", "--n-random", "1",
                       "--json")
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["perturbation"] == "noise σ=2"


@pytest.mark.slow
def test_edit_json_and_save(tmp_path, cli):
    save = tmp_path / "edited"
    code, out, _ = cli("edit", "--source", "dog", "--target", "cat", "--scenes", "60",
                       "--seed", "0", "--save", str(save), "--json")
    assert code == 0
    r = json.loads(out.strip().splitlines()[-1])
    for key in ("success", "generalization", "locality"):
        assert 0.0 <= r[key] <= 1.0
    assert r["n_neurons"] == 5 and r["converged"] and r["saved"] == str(save)
    assert (save / "edit.json").is_file() and (save / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["edited"]  # no temp folder left
    # the process's model was restored: a second run starts from the clean weights
    code, out, _ = cli("edit", "--source", "dog", "--target", "cat", "--scenes", "60",
                       "--seed", "0", "--json")
    assert json.loads(out.strip().splitlines()[-1])["final_margin"] == r["final_margin"]


@pytest.mark.parametrize("argv, needle", [
    (["edit", "--source", "dog", "--target", "spaceship", "--scenes", "4"], "choose one of: apple"),
    (["edit", "--source", "dog", "--target", "dog", "--scenes", "4"], "same word"),
    (["edit", "--source", "octopus", "--target", "cat", "--scenes", "3"], "nouns said"),
    (["edit", "--source", "dog", "--target", "cat", "--scenes", "4", "--units", "best"], "contribution, gradient, gradient_image, random"),
    (["perturb", "--scenes", "2", "--k", "999999"], "3072"),
    (["perturb", "--scenes", "2", "--sigma", "-1"], "--sigma"),
])
def test_bad_values_exit_2_with_one_line(argv, needle, cli):
    code, _, err = cli(*argv)
    # progress bars aside (tqdm prints "it/s]", or "s/it]" when an iteration takes over a second)
    lines = [l for l in err.strip().splitlines() if l.strip() and not re.search(r"(it/s|s/it)\]", l)]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and lines[0].startswith("mmneurons ")


def test_save_into_a_full_folder_is_refused_before_work(tmp_path, cli):
    (tmp_path / "x.txt").write_text("keep me")
    code, _, err = cli("edit", "--source", "dog", "--target", "cat", "--scenes", "4",
                       "--save", str(tmp_path))
    assert code == 2 and "already exists" in err
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
