"""Data-parallel ``find`` (``accelerate launch``): the same rows as one process, part files,
resuming, the merge (see :mod:`mmneurons_utils.batch.parallel`)."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from mmneurons_utils.batch.parallel import merge_parts, part_files, part_path
from mmneurons_utils.store.results import ResultFile, done_images, read_run

pytestmark = pytest.mark.slow   # the slow tier: every test here takes seconds to minutes

FIND = ["find", "--model", "tiny-llava", "--scenes", "6", "--seed", "3", "--top-k", "10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, *argv, processes=2):
    """``accelerate launch`` with ``processes`` CPU processes, as a real subprocess.

    ``accelerate launch --cpu`` starts one process only (accelerate runs several CPU processes
    through MPI); ``--multi_gpu`` with no GPU visible starts them with torchrun and they
    join over gloo. The config file is written here, so nothing is read from ~/.cache."""
    from accelerate.utils import write_basic_config

    config = tmp_path / "accelerate.yaml"
    if not config.exists():
        write_basic_config(mixed_precision="no", save_location=str(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
               "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "mmneurons_utils.cli", *argv]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def _done(path):
    return done_images(path)


def test_two_processes_write_the_rows_of_one(tmp_path, cli):
    """Two CPU processes under ``accelerate launch`` write exactly the file one process
    writes (rows, their order, the finished-image list); only the main process prints the
    JSON line; a rerun recomputes nothing and leaves the file as it is."""
    code, stdout, _ = cli(*FIND, "--out", str(tmp_path / "one.parquet"), "--json")
    assert code == 0
    one = json.loads(stdout.strip().splitlines()[-1])

    start = time.perf_counter()
    run = _launch(tmp_path, *FIND, "--out", "A.parquet", "--json")
    seconds = time.perf_counter() - start
    assert run.returncode == 0, run.stderr[-3000:]
    json_lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1 and run.stdout.strip().splitlines()[-1] == json_lines[0], run.stdout
    two = json.loads(json_lines[0])
    assert two["n_processes"] == 2 and two["n_new"] == 6 and two["n_skipped"] == 0, two
    assert {k: v for k, v in two.items() if k not in ("out", "n_processes")} == \
        {k: v for k, v in one.items() if k != "out"}
    # the processes really split the images: the main process's bar counts its 3 of the 6
    assert "find (contribution), process 0 of 2" in run.stderr and "3/3 [" in run.stderr, run.stderr

    a, b = pd.read_parquet(tmp_path / "one.parquet"), pd.read_parquet(tmp_path / "A.parquet")
    assert len(a) == one["n_rows"] > 0 and a["image_id"].nunique() > 1
    pd.testing.assert_frame_equal(a, b)   # bit for bit here; the tolerance keeps other CPUs safe
    assert _done(tmp_path / "A.parquet") == _done(tmp_path / "one.parquet") == \
        [f"scene-3-{i}" for i in range(6)]
    assert not part_files(tmp_path / "A.parquet") and not list(tmp_path.glob(".*.tmp"))

    before = (tmp_path / "A.parquet").stat().st_mtime_ns
    again = _launch(tmp_path, *FIND, "--out", "A.parquet", "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["n_new"] == 0 and summary["n_skipped"] == 6 and summary["n_rows"] == one["n_rows"], summary
    assert (tmp_path / "A.parquet").stat().st_mtime_ns == before and not part_files(tmp_path / "A.parquet")
    print(f"two-process accelerate launch: {seconds:.1f} s")


def _rows_of(table, names):
    return table[table["image_id"].isin(names)].reset_index(drop=True)


def test_an_interrupted_parallel_run_is_finished_by_one_process(tmp_path, cli):
    """A parallel run killed before its merge leaves part files and ``--out`` as it was; a
    one-process ``find`` identifies only what the parts lack and merges: the same file as an
    uninterrupted run, the rows of the images already in ``--out`` first, then image order."""
    reference = tmp_path / "reference.parquet"
    code, _, _ = cli(*FIND, "--out", str(reference))
    assert code == 0
    ref = pd.read_parquet(reference)
    names = [f"scene-3-{i}" for i in range(6)]
    out = tmp_path / "out.parquet"
    # --out already holds images 0 and 1 (an earlier, finished run on 2 scenes) …
    run = read_run(reference)          # the same settings and images as this run's

    def of_this_run(path):
        results = ResultFile(path)
        results.expect(run["settings"], run["images"])
        return results

    of_this_run(out).append(_rows_of(ref, names[:2]), names[:2])
    # … and a killed 2-process run got as far as image 4 (process 1) and 2 (process 0)
    of_this_run(part_path(out, 1, 2)).append(_rows_of(ref, names[4:5]), names[4:5])
    of_this_run(part_path(out, 0, 2)).append(_rows_of(ref, names[2:3]), names[2:3])
    code, stdout, _ = cli(*FIND, "--out", str(out), "--json")
    assert code == 0
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["n_new"] == 2 and summary["n_skipped"] == 4 and summary["n_processes"] == 1
    got = pd.read_parquet(out)
    # the 2 resumed images were captioned in a batch of 2, the reference's in a batch of 6: the
    # same units and ranks, scores equal up to the batch's float rounding (~1e-7)
    pd.testing.assert_frame_equal(got.drop(columns="score"), ref.drop(columns="score"), check_exact=True)
    np.testing.assert_allclose(got["score"], ref["score"], rtol=1e-5, atol=1e-6)
    assert _done(out) == names and not part_files(out)


def test_merge_parts_keeps_what_is_there_and_orders_by_image(tmp_path):
    """Rows already in ``--out`` are kept (a part's copy is ignored), an image in two parts
    comes from the first, new images follow in the run's order and unknown ones last."""
    def rows(*images):
        return pd.DataFrame(dict(image_id=[i for i in images for _ in range(2)],
                                 rank=[r for _ in images for r in range(2)]))

    out = tmp_path / "r.parquet"
    ResultFile(out).append(rows("c"), ["c"])
    ResultFile(part_path(out, 0, 2)).append(rows("e", "c", "x"), ["e", "c", "x"])
    ResultFile(part_path(out, 1, 2)).append(rows("b", "e"), ["b", "e", "empty"])
    (tmp_path / "r.parquet.part-notes.parquet").write_text("not a part")   # not matched
    assert [p.name for p in part_files(out)] == ["r.parquet.part-0-of-2.parquet",
                                                 "r.parquet.part-1-of-2.parquet"]
    assert merge_parts(out, ["a", "b", "c", "d", "e", "empty"]) == 4
    merged = ResultFile(out)
    assert merged.done == ["c", "b", "e", "empty", "x"]
    assert list(merged.table["image_id"]) == ["c", "c", "b", "b", "e", "e", "x", "x"]
    assert list(merged.table["rank"]) == [0, 1] * 4
    assert not part_files(out) and (tmp_path / "r.parquet.part-notes.parquet").exists()
    assert merge_parts(out, ["a"]) == 0


class _TwoProcessMain:
    """The main process of two, as :class:`PartRun` sees it (no process group: the other
    process's report is given)."""
    num_processes, process_index, is_main_process = 2, 0, True

    def __init__(self):
        from contextlib import contextmanager

        self.split_between_processes = contextmanager(lambda todo: (yield todo[:len(todo) // 2 + 1]))

    def wait_for_everyone(self):
        pass


def test_a_part_the_main_process_cannot_see_is_an_error(tmp_path, monkeypatch):
    """Machines without a shared filesystem: the main process does not find the other
    process's part file; it says so and leaves ``--out`` alone."""
    import accelerate.utils

    from mmneurons_utils.batch.parallel import PartRun

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", lambda objects: objects)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda reports: reports + [(1, 2)])
    out = tmp_path / "r.parquet"
    run = PartRun(out, ["a", "b", "c", "d"], [], _TwoProcessMain())
    assert run.todo == [0, 1, 2, 3] and run.mine == [0, 1, 2]
    run.part.append(pd.DataFrame(dict(image_id=["a"], rank=[0])), ["a", "b", "c"])
    with pytest.raises(ValueError, match="process 1 identified 2 images into .*part-1-of-2.parquet, "
                                         "which the main process cannot see; put --out on a "
                                         "filesystem that every machine shares"):
        run.finish()
    assert not out.exists() and part_files(out) == [part_path(out, 0, 2)]


def test_a_foreign_part_file_is_a_one_line_error(tmp_path, cli):
    out = tmp_path / "r.parquet"
    part_path(out, 0, 2).write_text("my notes")
    code, _, err = cli(*FIND, "--out", str(out))
    assert code == 2 and "not a readable parquet file" in err and len(err.strip().splitlines()) == 1
    assert part_path(out, 0, 2).read_text() == "my notes" and not out.exists()


def test_atlas_refuses_several_processes(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, out, err = cli("atlas", "--scenes", "2", "--out", str(tmp_path / "atlas"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "atlas runs in one process" in err and "(process 1 of 2)" in err
    assert not (tmp_path / "atlas").exists()


@pytest.mark.parametrize("value", ["two", "2x"])
def test_a_bad_world_size_is_a_one_line_error(tmp_path, cli, monkeypatch, value):
    monkeypatch.setenv("WORLD_SIZE", value)
    code, _, err = cli(*FIND, "--out", str(tmp_path / "r.parquet"))
    assert code == 2 and "WORLD_SIZE" in err and len(err.strip().splitlines()) == 1
