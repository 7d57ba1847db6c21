import json

import pytest

from mmneurons_utils.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_describe_scenes_json_last_line(capsys):
    code, out, _ = _run(capsys, "describe", "--model", "tiny-llava", "--scenes", "4", "--seed", "2",
                        "--json")
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n_images"] == 4 and len(result["captions"]) == 4
    assert {"noun_recall", "noun_precision", "exact_match"} <= set(result)


def test_describe_image_folder(tmp_path, capsys):
    from mmneurons_utils import make_scenes

    for s in make_scenes(2, seed=3):
        s.image.save(tmp_path / f"s{s.index}.png")
    code, out, _ = _run(capsys, "describe", "--images", str(tmp_path))
    assert code == 0 and out.count("s0.png:") == 1 and out.count("s1.png:") == 1


def test_unreadable_image_names_the_file(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code, _, err = _run(capsys, "describe", "--images", str(tmp_path))
    assert code == 2 and "broken.png" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, needle", [
    (["describe", "--model", "nope", "--scenes", "2"], "tiny-llava"),
    (["describe", "--scenes", "2", "--device", "gpu9"], "device"),
    (["describe", "--images", "/no/such/folder"], "not a folder"),
])
def test_bad_values_exit_2_with_one_line(argv, needle, capsys):
    code, _, err = _run(capsys, *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["describe", "--scenes", "0"], ["describe", "--scenes", "2", "--seed", "-1"],
                                  ["describe", "--scenes", "x"]])
def test_bad_numbers_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "expected" in capsys.readouterr().err
