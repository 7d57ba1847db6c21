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


# --- your own images: export-scenes, --images with --annotations ---------------------------------

def _last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_export_scenes_writes_a_coco_folder_and_refuses_a_used_one(tmp_path, cli):
    from mmneurons_utils import make_scenes
    from mmneurons_utils.data.datasets import load_images
    from mmneurons_utils.tiny.scenes import NOUNS

    out = tmp_path / "folder"
    code, stdout, _ = cli("export-scenes", "--scenes", "3", "--seed", "5", "--out", str(out), "--json")
    result = _last_json(stdout)
    scenes = make_scenes(3, seed=5)
    assert code == 0 and result["n_images"] == 3 and result["n_boxes"] == sum(len(s.boxes) for s in scenes)
    data = load_images(out, result["annotations"])
    assert [s.boxes for s in data] == [s.boxes for s in scenes]
    assert set(data.categories) == set(NOUNS)          # the scenes' categories, not just those drawn
    before = sorted(p.name for p in out.iterdir())
    code, _, err = cli("export-scenes", "--scenes", "3", "--out", str(out))
    assert code == 2 and "not empty" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == before


def test_find_on_the_exported_folder_gives_the_scenes_rows(tmp_path, cli):
    """The folder path (PNG + COCO annotations) and the scenes path: the same rows."""
    import pandas as pd

    folder = tmp_path / "folder"
    assert cli("export-scenes", "--scenes", "5", "--seed", "3", "--out", str(folder))[0] == 0
    code, stdout, _ = cli("find", "--scenes", "5", "--seed", "3", "--top-k", "8",
                          "--out", str(tmp_path / "scenes.parquet"), "--json")
    assert code == 0
    from_scenes = _last_json(stdout)
    code, stdout, _ = cli("find", "--images", str(folder), "--annotations", str(folder / "annotations.json"),
                          "--seed", "3", "--top-k", "8", "--out", str(tmp_path / "folder.parquet"), "--json")
    assert code == 0
    from_folder = _last_json(stdout)
    assert from_scenes["noun_source"] == from_folder["noun_source"] and "vocabulary" in from_folder["noun_source"]
    assert from_scenes["n_rows"] == from_folder["n_rows"] > 0
    a, b = pd.read_parquet(tmp_path / "scenes.parquet"), pd.read_parquet(tmp_path / "folder.parquet")
    columns = ["caption", "noun", "rank", "layer", "unit", "score", "polarity", "top_tokens"]
    pd.testing.assert_frame_equal(a[columns].reset_index(drop=True), b[columns].reset_index(drop=True))
    assert list(a.image_id.unique()) == [f"scene-3-{i}" for i in range(5) if f"scene-3-{i}" in set(a.image_id)]
    assert set(b.image_id) <= {f"image_{i:04d}.png" for i in range(5)}
    # the human-readable run says where the nouns came from
    code, stdout, _ = cli("find", "--images", str(folder), "--annotations", str(folder / "annotations.json"),
                          "--top-k", "8", "--out", str(tmp_path / "folder.parquet"))
    assert code == 0 and "caption nouns from" in stdout and "5 already done" in stdout


def test_annotations_give_a_real_model_its_candidate_nouns(tmp_path, cli):
    """A checkpoint without a noun vocabulary and no spaCy: --annotations' categories are its
    candidate nouns, and the captions' nouns are the embedded vocabulary's."""
    import shutil

    from mmneurons_utils.model.nouns import tagger_available
    from mmneurons_utils.model.embedded import embedded_folder
    from mmneurons_utils.model.vlm import EMBEDDED_MARKER

    if tagger_available():
        pytest.skip("spaCy's tagger is installed: it, not the candidates, finds the nouns")
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(embedded_folder("tiny-llava"), checkpoint)
    (checkpoint / EMBEDDED_MARKER).unlink()        # now a "real" model: no noun vocabulary
    folder = tmp_path / "folder"
    assert cli("export-scenes", "--scenes", "4", "--seed", "6", "--out", str(folder))[0] == 0
    code, stdout, _ = cli("describe", "--scenes", "4", "--seed", "6", "--json")
    truth = _last_json(stdout)
    code, stdout, _ = cli("describe", "--model", str(checkpoint), "--images", str(folder),
                          "--annotations", str(folder / "annotations.json"), "--json")
    got = _last_json(stdout)
    assert code == 0 and "candidate nouns" in got["noun_source"]
    assert [r["caption"] for r in got["captions"]] == [r["caption"] for r in truth["captions"]]
    assert [r["nouns"] for r in got["captions"]] == [r["nouns"] for r in truth["captions"]]
    assert any(r["nouns"] for r in got["captions"])
    assert all(r["objects"] for r in got["captions"])          # the annotation's object names
    with pytest.warns(UserWarning, match="spaCy"):             # no annotations: no nouns, one warning
        code, stdout, _ = cli("describe", "--model", str(checkpoint), "--images", str(folder), "--json")
    bare = _last_json(stdout)
    assert code == 0 and all(r["nouns"] == [] for r in bare["captions"]) and "none" in bare["noun_source"]


@pytest.mark.parametrize("argv, needle", [
    (["find", "--scenes", "2", "--annotations", "a.json", "--out", "r.parquet"], "--annotations needs --images"),
    (["find", "--images", "{folder}", "--annotations", "{folder}/missing.json", "--out", "r.parquet"],
     "does not exist"),
    (["find", "--images", "{folder}", "--annotations", "{folder}/image_0000.png", "--out", "r.parquet"],
     "is not JSON"),
    (["describe", "--images", "{folder}", "--annotations", "{other}/annotations.json"], "none of the 2 images"),
    (["atlas", "--images", "{folder}/nothing", "--out", "{folder}/atlas"], "not a folder"),
    (["export-scenes", "--scenes", "1", "--out", "{folder}/image_0000.png"], "not a folder"),
])
def test_own_image_errors_exit_2_with_one_line(tmp_path, argv, needle, cli, monkeypatch):
    from mmneurons_utils import make_scenes
    from mmneurons_utils.data.datasets import write_image_folder

    write_image_folder(make_scenes(2, seed=0), tmp_path / "folder")
    other = write_image_folder(make_scenes(1, seed=0), tmp_path / "other")
    (other / "annotations.json").write_text((other / "annotations.json").read_text()
                                            .replace("image_0000.png", "photo.jpg"))
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(*[a.format(folder=tmp_path / "folder", other=other) for a in argv])
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_atlas_on_the_exported_folder_is_the_scenes_atlas(tmp_path, cli):
    from mmneurons_utils.atlas.build import read_atlas

    folder = tmp_path / "folder"
    assert cli("export-scenes", "--scenes", "8", "--seed", "1", "--out", str(folder))[0] == 0
    common = ["--seed", "1", "--top-k", "5", "--examples", "3", "--json"]
    code, stdout, _ = cli("atlas", "--scenes", "8", *common, "--out", str(tmp_path / "a"))
    assert code == 0
    code, stdout, _ = cli("atlas", "--images", str(folder), "--annotations", str(folder / "annotations.json"),
                          *common, "--out", str(tmp_path / "b"))
    assert code == 0
    (a, meta_a), (b, meta_b) = read_atlas(tmp_path / "a" / "atlas.parquet"), read_atlas(tmp_path / "b" / "atlas.parquet")
    assert len(a) > 0 and a.equals(b)
    assert "annotations" in meta_b["description"]["source"] and "annotations" not in meta_a["description"]["source"]


# --- every subcommand's flags say what they do; report and compare-editors (issue 29) ---------------

COMMANDS = ("describe", "find", "bench", "perturb", "edit", "atlas", "report", "compare-editors", "export-scenes")


def _subcommands() -> dict:
    import argparse

    from mmneurons_utils.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def test_the_list_of_commands_is_the_parsers():
    assert set(_subcommands()) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_every_flag_with_its_help(command, capsys, cli):
    import argparse

    with pytest.raises(SystemExit) as info:
        cli(command, "--help")
    text = " ".join(capsys.readouterr().out.split())
    assert info.value.code == 0
    flags = [a for a in _subcommands()[command]._actions
             if a.option_strings and a.help != argparse.SUPPRESS and "--help" not in a.option_strings]
    assert flags
    for action in flags:
        assert action.help and len(action.help) > 10, action.option_strings
        assert all(option in text for option in action.option_strings), action.option_strings
        assert " ".join(action.help.split())[:24] in text, action.option_strings


@pytest.mark.parametrize("argv, needle", [
    (["report", "--model", "nope", "--scenes", "2"], "unknown model"),
    (["report", "--scenes", "2", "--device", "gpu9"], "device"),
    (["compare-editors", "--out", "{tmp}/t.csv", "--configs", "ft"], "method:k"),
    (["compare-editors", "--out", "{tmp}/t.csv", "--configs", "sgd:5"], "unknown editor"),
    (["compare-editors", "--out", "{tmp}/t.csv", "--shard", "2/2"], "K/N"),
    (["compare-editors", "--out", "{tmp}/t.txt"], ".csv"),
    (["compare-editors", "--out", "{tmp}/no/t.csv"], "does not exist"),
])
def test_report_and_compare_editors_bad_values_exit_2_with_one_line(argv, needle, tmp_path, cli):
    code, _, err = cli(*[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"mmneurons {argv[0]}: error: ")
    assert not list(tmp_path.iterdir())                     # nothing written


@pytest.mark.parametrize("argv", [["report", "--scenes", "0"], ["report", "--k", "x"], ["report", "--ablate", "0"],
                                  ["compare-editors", "--out", "t.csv", "--pairs", "0"],
                                  ["compare-editors", "--out", "t.csv", "--max-minutes", "-1"],
                                  ["compare-editors", "--out", "t.csv", "--scenes", "100001"],
                                  ["compare-editors"]])
def test_report_and_compare_editors_bad_flags_exit_2(argv, capsys, cli):
    with pytest.raises(SystemExit) as info:
        cli(*argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"mmneurons {argv[0]}: error: ")


@pytest.mark.parametrize("module, command", [("model_report", "report"), ("editor_comparison", "compare-editors")])
def test_the_old_module_entry_points_are_aliases_of_the_commands(module, command):
    """``python -m mmneurons_utils.batch.<module>`` runs ``mmneurons <command>``: its errors, its exit codes."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", f"mmneurons_utils.batch.{module}", "--steps" if module ==
                           "editor_comparison" else "--k", "0"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"mmneurons {command}: error: argument --")
