import json

import pytest


def test_describe_scenes_json_last_line(cli):
    code, out, _ = cli("describe", "--model", "tiny-llava", "--scenes", "4", "--seed", "2",
                       "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n_images"] == 4 and len(result["captions"]) == 4
    assert {"noun_recall", "noun_precision", "exact_match"} <= set(result)


def test_describe_image_folder(tmp_path, cli):
    from mmneurons_utils import make_scenes

    for s in make_scenes(2, seed=3):
        s.image.save(tmp_path / f"s{s.index}.png")
    code, out, _ = cli("describe", "--images", str(tmp_path))
    assert code == 0 and out.count("s0.png:") == 1 and out.count("s1.png:") == 1


def test_unreadable_image_names_the_file(tmp_path, cli):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code, _, err = cli("describe", "--images", str(tmp_path))
    assert code == 2 and "broken.png" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["describe", "--model", "nope", "--scenes", "2"], "tiny-llava"),
    (["describe", "--scenes", "2", "--device", "gpu9"], "device"),
    (["describe", "--images", "/no/such/folder"], "not a folder"),
])
def test_bad_values_exit_2_with_one_line(argv, needle, cli):
    code, _, err = cli(*argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["describe", "--scenes", "0"], ["describe", "--scenes", "2", "--seed", "-1"],
                                  ["describe", "--scenes", "x"]])
def test_bad_numbers_exit_2(argv, capsys, cli):
    with pytest.raises(SystemExit) as info:
        cli(*argv)
    assert info.value.code == 2
    assert "expected" in capsys.readouterr().err


def test_find_is_resumable_and_atomic(tmp_path, cli):
    import pandas as pd

    out = tmp_path / "results.parquet"
    code, stdout, _ = cli("find", "--scenes", "3", "--seed", "4", "--top-k", "5", "--out", str(out),
                          "--batch-size", "2", "--json")
    assert code == 0
    first = json.loads(stdout.strip().splitlines()[-1])
    table = pd.read_parquet(out)
    assert first["n_new"] == 3 and first["n_rows"] == len(table) > 0
    assert {"image_id", "caption", "noun", "token_id", "rank", "layer", "unit", "score", "top_tokens"} <= set(table.columns)
    assert (table.groupby(["image_id", "noun"]).size() == 5).all()
    code, stdout, _ = cli("find", "--scenes", "4", "--seed", "4", "--top-k", "5", "--out", str(out), "--json")
    again = json.loads(stdout.strip().splitlines()[-1])
    assert again["n_skipped"] == 3 and again["n_new"] == 1
    assert pd.read_parquet(out).image_id.nunique() >= table.image_id.nunique()
    assert not list(tmp_path.glob(".*.tmp"))


def test_find_refuses_a_foreign_file_and_bad_top_k(tmp_path, cli):
    foreign = tmp_path / "notes.parquet"
    foreign.write_text("my notes")
    code, _, err = cli("find", "--scenes", "1", "--out", str(foreign))
    assert code == 2 and "not a readable parquet file" in err
    assert foreign.read_text() == "my notes"
    code, _, err = cli("find", "--scenes", "1", "--top-k", "5000", "--out", str(tmp_path / "r.parquet"))
    assert code == 2 and "top_k must be an integer in 1 … 3072" in err
    assert not (tmp_path / "r.parquet").exists()
