"""Faults of the editor comparison and the notebook runner (issue 28): two runs on one CSV,
Ctrl-C, flags that name nothing to do, settings files that are not ours, misspelt or mistyped
notebook parameters. Each is one line (exit 2 for bad input, 130 for Ctrl-C), before any work,
leaving no stray file or folder."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
COMPARISON = [sys.executable, "-m", "mmneurons_utils.cli", "compare-editors"]


def default_sigint():
    """Ctrl-C as a terminal delivers it: a run started in the background (``cmd &``, a CI runner)
    inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _comparison(*argv, timeout=300):
    done = subprocess.run(COMPARISON + list(argv), env=ENV, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


def _compare(*argv) -> int:
    """``mmneurons compare-editors`` in this process: its exit code (argparse's own errors exit)."""
    from mmneurons_utils.cli import main

    try:
        return main(["compare-editors", *argv])
    except SystemExit as stop:
        return stop.code


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# --- the editor comparison ------------------------------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--pairs", "0"], "--pairs"), (["--scenes", "0"], "--scenes"), (["--steps", "0"], "--steps"),
    (["--max-minutes", "-1"], "--max-minutes"),
])
def test_comparison_counts_must_be_positive_and_the_flag_is_named(tmp_path, capsys, flags, needle):
    code = _compare(*flags, "--out", str(tmp_path / "t.csv"))
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and needle in line
    assert not list(tmp_path.iterdir())


def test_comparison_out_must_be_a_csv_file_in_an_existing_folder(tmp_path, capsys, monkeypatch):
    from mmneurons_utils.batch import editor_comparison as ec

    def never(*args, **kwargs):
        raise AssertionError("the model loaded before --out was checked")

    monkeypatch.setattr(ec, "load_vlm", never)
    (tmp_path / "folder.csv").mkdir()
    for out, needle in ((tmp_path / "folder.csv", "is a folder"), (tmp_path / "nope" / "t.csv", "does not exist")):
        code = _compare("--out", str(out))
        assert code == 2 and needle in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("content", ['[1, 2]', '{"mine": true}', "not json"])
def test_a_settings_file_that_is_not_ours_is_refused_and_left_untouched(tmp_path, capsys, monkeypatch, content):
    from mmneurons_utils.batch import editor_comparison as ec

    def never(*args, **kwargs):
        raise AssertionError("the model loaded before the settings file was checked")

    monkeypatch.setattr(ec, "load_vlm", never)
    record = tmp_path / "t.csv.settings.json"      # the user's own file, and no CSV
    record.write_text(content)
    code = _compare("--out", str(tmp_path / "t.csv"))
    line = _one_line(capsys.readouterr().err)
    assert code == 2 and "t.csv.settings.json" in line and "left untouched" in line
    assert record.read_text() == content
    with pytest.raises(ec.EditInputError):          # the library refuses it too
        ec.check_settings(tmp_path / "t.csv", dict(model="m"))
    assert record.read_text() == content


@pytest.mark.slow
def test_a_failed_comparison_leaves_no_stray_settings_file(tmp_path):
    out = tmp_path / "t.csv"
    code, err = _comparison("--scenes", "2", "--min-images", "50", "--out", str(out))
    assert code == 2 and "no noun" in _one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []      # no record, no CSV, no lock


@pytest.mark.slow
def test_a_second_comparison_on_one_csv_waits_for_the_lock_and_ctrl_c_is_130(tmp_path):
    """The comparison takes the lock of ``find``: a second run on the same CSV waits (saying so)
    instead of duplicating every row; Ctrl-C while it waits is one line and exit 130."""
    from mmneurons_utils.store.files import exclusive

    out = tmp_path / "t.csv"
    with exclusive(out):
        process = subprocess.Popen(COMPARISON + ["--scenes", "8", "--pairs", "1", "--configs", "ft:5",
                                                 "--steps", "1", "--out", str(out)],
                                   env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                   preexec_fn=default_sigint)
        seen = []
        for line in process.stderr:
            seen.append(line)
            if "is being written by another run" in line:
                process.send_signal(signal.SIGINT)
                break
        err = "".join(seen) + process.communicate(timeout=300)[1]
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err and "rerun to resume" in err
    assert not out.exists() and not (tmp_path / "t.csv.settings.json").exists()


def test_comparison_rows_are_written_whole_and_read_once(tmp_path, monkeypatch):
    """Rows are written through a temporary file (the CSV is never half a row); a CSV holding a
    row twice (two runs of an older version) is read with it once."""
    import pandas as pd

    from mmneurons_utils.batch import editor_comparison as ec

    out = tmp_path / "t.csv"
    row = dict(source="dog", target="cat", method="ft", k=5, success=1.0)
    pd.DataFrame([row, row]).to_csv(out, index=False)
    made = []

    def evaluate(vlm, pool, source, target, method, k, **kwargs):
        made.append((source, target, method, k))
        return None, dict(source=source, target=target, method=method, k=k, success=0.5)

    monkeypatch.setattr(ec, "evaluate_editor", evaluate)
    table = ec.compare_editors(None, None, [("dog", "cat"), ("cat", "dog")], [("ft", 5)], out=out)
    assert made == [("cat", "dog", "ft", 5)] and len(table) == 2
    assert len(pd.read_csv(out)) == 2 and not list(tmp_path.glob(".t.csv.*"))


# --- the notebook runner -------------------------------------------------------------------------------

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture
def no_papermill(monkeypatch):
    """papermill never starts: a check that should have refused first fails the test."""
    import papermill

    def never(*args, **kwargs):
        raise AssertionError("papermill started")

    monkeypatch.setattr(papermill, "execute_notebook", never)


@pytest.mark.parametrize("argv, needles", [
    (["-p", "n_imagse", "2"], ["n_imagse", "did you mean n_images"]),
    (["-p", "n_images", "0"], ["n_images", "positive integer"]),
    (["-p", "n_images", "abc"], ["n_images", "an integer"]),
    (["-p", "model", "no-such-model"], ["model", "unknown model"]),
    (["-p", "ks", "5", "--only", "04"], ["ks", "list"]),
    (["-p", "images", "no/such/folder"], ["images", "does not exist"]),
    (["--only", "99"], ["99", "there are: 00"]),
    (["--notebooks", "no-such-folder"], ["no-such-folder", "does not exist"]),
    (["-p", "model"], ["NAME VALUE"]),
])
def test_runner_checks_everything_before_papermill_and_makes_no_folder(tmp_path, capsys, no_papermill,
                                                                       argv, needles):
    from mmneurons_utils.companion.run_notebooks import main

    if "--notebooks" not in argv:
        argv = ["--notebooks", str(NOTEBOOKS)] + argv
    with pytest.raises(SystemExit) as stop:
        main(argv + ["--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "run").exists()


def test_runner_parameters_take_the_defaults_types(no_papermill):
    from mmneurons_utils.companion.run_notebooks import check_parameters, notebook_paths

    paths = notebook_paths(NOTEBOOKS, ["00"])
    assert check_parameters(paths, {"device": 0, "n_images": 3, "model": "tiny-instructblip"}) == {
        "device": "0", "n_images": 3, "model": "tiny-instructblip"}
    assert check_parameters(notebook_paths(NOTEBOOKS, ["01"]), {"compare_model": ""}) == {"compare_model": ""}


def test_a_failing_notebook_is_one_line_naming_its_executed_copy(tmp_path, capsys, monkeypatch):
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from mmneurons_utils.companion.run_notebooks import main

    def fail(source, copy, **kwargs):
        Path(copy).write_text("{}")
        raise PapermillExecutionError(3, 4, "load_vlm(model)", "ModelLoadError",
                                      "unknown model 'x'\nsecond line", ["a", "long", "traceback"])

    monkeypatch.setattr(papermill, "execute_notebook", fail)
    with pytest.raises(SystemExit) as stop:
        main(["--notebooks", str(NOTEBOOKS), "--only", "00", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert "00_setup.ipynb failed in cell 4: ModelLoadError: unknown model 'x' second line" in err
    assert str(tmp_path / "run" / "notebooks" / "00_setup.ipynb") in err
    assert json.loads((tmp_path / "run" / "timings.json").read_text())["00_setup.ipynb"] >= 0
