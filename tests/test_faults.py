"""Faults a real machine has (issue 28): a full disk, Ctrl-C, outputs the system refuses,
symbolic links, lock files, damaged caches and checkpoints, half-written folders, unbounded
input, images and annotation files that only look fine. Each ends in one line naming the file
or flag and what to do, and nothing of the user's is lost, overwritten or left half-written.

A full disk is simulated by patching the writer (``OSError(ENOSPC)``); Ctrl-C is a real
SIGINT to a real process, sent once it waits where a user would press it."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

FIND = ["find", "--model", "tiny-llava", "--top-k", "5"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def default_sigint():
    """Ctrl-C as a terminal delivers it: a run started in the background (``cmd &``, a CI runner)
    inherits SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler in the child."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _one_line(err: str, command: str) -> str:
    """The one message line of a failed command (progress bars aside), with no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"mmneurons {command}:")]
    assert len(lines) == 1, err
    return lines[0]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _run_cli(*argv, timeout=180):
    """The console script in its own process: ``(code, stdout, stderr)``."""
    done = subprocess.run([sys.executable, "-m", "mmneurons_utils.cli", *argv], env=ENV,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


# --- a full disk -------------------------------------------------------------------------------

def test_a_full_disk_in_find_is_one_line_and_keeps_the_finished_file(tmp_path, cli, monkeypatch):
    out = tmp_path / "r.parquet"
    assert cli(*FIND, "--scenes", "1", "--out", str(out))[0] == 0
    before = out.read_bytes()
    import pyarrow.parquet as pq

    monkeypatch.setattr(pq, "write_table", _enospc)
    code, _, err = cli(*FIND, "--scenes", "2", "--out", str(out))
    line = _one_line(err, "find")
    assert code == 1 and "No space left on device" in line and "free some space" in line
    assert out.read_bytes() == before                                   # the finished rows are intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]  # no temporary or lock file


def test_a_full_disk_in_export_scenes_leaves_nothing_half_written(tmp_path, cli, monkeypatch):
    calls = []
    real_save = Image.Image.save

    def save(self, *args, **kwargs):     # the disk fills at the third image
        calls.append(1)
        if len(calls) == 3:
            _enospc()
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "scenes"
    code, _, err = cli("export-scenes", "--scenes", "5", "--out", str(out))
    assert code == 1 and "No space left on device" in _one_line(err, "export-scenes")
    assert not out.exists() and not list(tmp_path.iterdir())          # nothing left to block a rerun
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert cli("export-scenes", "--scenes", "5", "--out", str(out))[0] == 0
    assert len(list(out.glob("*.png"))) == 5 and (out / "annotations.json").is_file()


def test_too_little_room_for_an_edited_model_is_refused_before_the_edit(tmp_path, cli, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1000))
    code, _, err = cli("edit", "--source", "dog", "--target", "cat", "--scenes", "8", "--steps", "1",
                       "--save", str(tmp_path / "edited"))
    line = _one_line(err, "edit")
    assert code == 2 and "--save" in line and "free" in line
    assert not (tmp_path / "edited").exists()


def test_a_full_disk_in_atlas_is_one_line_and_leaves_no_half_file(tmp_path, cli, monkeypatch):
    import mmneurons_utils.commands.atlas as atlas_command

    monkeypatch.setattr(atlas_command, "write_atlas", _enospc)
    out = tmp_path / "atlas"
    code, _, err = cli("atlas", "--scenes", "4", "--top-k", "3", "--examples", "2", "--out", str(out))
    assert code == 1 and "No space left on device" in _one_line(err, "atlas")
    assert not out.exists()                                  # the folder it made is gone again


def test_too_little_room_for_the_scenes_is_refused_before_writing(tmp_path, cli, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 20, 10 << 20, 1000))
    code, _, err = cli("export-scenes", "--scenes", "50", "--out", str(tmp_path / "scenes"))
    assert code == 2 and "needs about" in _one_line(err, "export-scenes")
    assert not (tmp_path / "scenes").exists()


def test_os_errors_are_one_line_with_the_file_and_the_right_exit_code():
    from mmneurons_utils.store.files import os_error_exit_code, os_error_line

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/r.parquet")
    assert os_error_line(full) == ("No space left on device (/data/r.parquet); free some space (or "
                                   "choose another place) and rerun")
    assert os_error_exit_code(full) == 1
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/r.parquet")
    assert "choose a place you can write" in os_error_line(denied) and os_error_exit_code(denied) == 2
    arrow = OSError("error writing file: No space left on device. Detail: [errno 28]")   # pyarrow's
    assert "No space left on device" in os_error_line(arrow) and os_error_exit_code(arrow) == 1


# --- outputs the system refuses --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("argv, needle", [
    (FIND + ["--scenes", "1", "--out", "/proc/x.parquet"], "/proc"),
    (FIND + ["--scenes", "1", "--out", "/sys/x.parquet"], "/sys"),
    (["export-scenes", "--scenes", "1", "--out", "/proc/scenes"], "/proc"),
    (["edit", "--source", "dog", "--target", "cat", "--scenes", "4", "--save", "/proc/edited"], "/proc"),
])
def test_outputs_on_pseudo_file_systems_are_refused_not_waited_for(argv, needle):
    if not Path(needle).is_dir():
        pytest.skip(f"no {needle} here")
    code, _, err = _run_cli(*argv)       # its own process: today's code waits forever on /proc
    line = _one_line(err, argv[0])
    assert code == 2 and needle in line and "not writable" in line


@pytest.mark.slow
def test_a_lock_file_that_cannot_be_opened_is_one_line(tmp_path):
    out = tmp_path / "r.parquet"
    (tmp_path / ".r.parquet.lock").mkdir()     # a lock file no process can open (even root)
    code, _, err = _run_cli(*FIND, "--scenes", "1", "--out", str(out))
    line = _one_line(err, "find")
    assert code == 2 and ".r.parquet.lock" in line and not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens any file")
def test_another_users_read_only_lock_file_still_locks(tmp_path, cli):
    out = tmp_path / "r.parquet"
    lock = tmp_path / ".r.parquet.lock"
    lock.touch()
    lock.chmod(0o444)
    assert cli(*FIND, "--scenes", "1", "--out", str(out))[0] == 0


def test_no_lock_file_is_left_behind(tmp_path, cli):
    out = tmp_path / "r.parquet"
    assert cli(*FIND, "--scenes", "1", "--out", str(out))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.parquet"]


def test_a_symlinked_out_is_written_at_its_target_under_the_targets_lock(tmp_path, cli):
    from mmneurons_utils.store.files import exclusive, lock_path

    real = tmp_path / "data" / "r.parquet"
    real.parent.mkdir()
    link = tmp_path / "link.parquet"
    link.symlink_to(real)
    assert cli(*FIND, "--scenes", "1", "--out", str(link))[0] == 0
    assert link.is_symlink() and real.is_file()                  # the link is still the link
    assert cli(*FIND, "--scenes", "2", "--out", str(link))[0] == 0
    assert link.is_symlink() and pd.read_parquet(real).image_id.nunique() == 2   # the target resumed
    assert lock_path(link) == lock_path(real)                     # the two names: one lock
    with exclusive(link) as target:
        assert target == real
    assert not list((tmp_path / "data").glob(".*.lock")) and not list(tmp_path.glob(".*.lock"))


# --- Ctrl-C ------------------------------------------------------------------------------------------

def _interrupt_while_waiting(argv, out: Path, prefix="mmneurons"):
    """Hold the lock of ``out``, start ``argv`` (which must wait for it), SIGINT it once it says
    it waits: ``(code, stderr)``."""
    from mmneurons_utils.store.files import exclusive

    with exclusive(out):
        process = subprocess.Popen(argv, env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                   preexec_fn=default_sigint)
        lines = []
        for line in process.stderr:        # what it says before it waits (notes, progress)
            lines.append(line)
            if "is being written by another run" in line:
                process.send_signal(signal.SIGINT)
                break
        rest = process.communicate(timeout=120)[1]
    return process.returncode, "".join(lines) + rest


@pytest.mark.slow
def test_ctrl_c_at_the_waiting_prompt_is_one_line_and_exit_130(tmp_path):
    out = tmp_path / "r.parquet"
    code, err = _interrupt_while_waiting(
        [sys.executable, "-m", "mmneurons_utils.cli", *FIND, "--scenes", "1", "--out", str(out)], out)
    line = _one_line(err, "find")
    assert code == 130 and "interrupted" in line and "rerun to resume" in line
    assert not out.exists()


_KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    from PIL import Image
    real_save, calls = Image.Image.save, []

    def save(self, *args, **kwargs):      # killed outright (kill -9) while writing the third image
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(self, *args, **kwargs)

    Image.Image.save = save
    from mmneurons_utils.cli import main
    sys.exit(main(["export-scenes", "--scenes", "5", "--out", sys.argv[1]]))
""")


@pytest.mark.slow
def test_an_export_killed_half_way_leaves_no_empty_image_and_does_not_block_a_rerun(tmp_path, cli):
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_EXPORT)
    out = tmp_path / "scenes"
    done = subprocess.run([sys.executable, str(script), str(out)], env=ENV, capture_output=True, timeout=180)
    assert done.returncode == -signal.SIGKILL
    assert not (out / "annotations.json").exists()
    assert all(p.stat().st_size > 0 for p in out.glob("*.png"))          # no 0-byte image
    code, _, err = cli("export-scenes", "--scenes", "5", "--out", str(out))
    assert code == 0, err
    assert len(list(out.glob("image_*.png"))) == 5 and sorted(p.name for p in out.iterdir() if
                                                              not p.name.startswith("image_")) == ["annotations.json"]
    coco = json.loads((out / "annotations.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == [f"image_{i:04d}.png" for i in range(5)]


def test_export_scenes_refuses_a_folder_it_did_not_write(tmp_path, cli):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "image_0000.png").write_bytes(b"my own file")
    code, _, err = cli("export-scenes", "--scenes", "2", "--out", str(out))
    assert code == 2 and "not empty" in _one_line(err, "export-scenes")
    assert (out / "image_0000.png").read_bytes() == b"my own file"


# --- unbounded and ignored input ---------------------------------------------------------------------

def test_scenes_has_a_documented_upper_bound_checked_before_any_scene_is_built(monkeypatch, capsys):
    import mmneurons_utils.commands.find as find_command
    import mmneurons_utils.data.datasets as datasets
    import mmneurons_utils.tiny.scenes as scenes
    from mmneurons_utils.cli import main

    def never(*args, **kwargs):
        raise AssertionError("scenes built before --scenes was checked")

    monkeypatch.setattr(datasets, "_SCENE_SOURCES", [never])      # every way scenes get built
    monkeypatch.setattr(scenes, "make_scenes", never)
    monkeypatch.setattr(find_command, "make_scenes", never)
    with pytest.raises(SystemExit) as stop:
        main(["describe", "--scenes", "100000000"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--scenes" in err and "at most 100000" in err
    with pytest.raises(SystemExit):
        main(["describe", "--help"])
    assert "at most 100000" in capsys.readouterr().out


def test_absolute_without_sigma_is_refused(cli):
    code, _, err = cli("perturb", "--scenes", "1", "--k", "1", "--n-random", "1", "--absolute")
    line = _one_line(err, "perturb")
    assert code == 2 and "--absolute" in line and "--sigma" in line


# --- images and annotation files --------------------------------------------------------------------

def test_a_transparent_png_is_read_as_a_viewer_shows_it(tmp_path):
    from mmneurons_utils.data.images import read_image

    hidden = Image.new("RGBA", (8, 8), (255, 0, 0, 0))        # red, fully transparent
    hidden.save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))           # black at half opacity: grey
    half.save(tmp_path / "half.png")
    assert read_image(tmp_path / "half.png").getpixel((0, 0)) == (127, 127, 127)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)          # index 0: blue, marked transparent
    palette.save(tmp_path / "palette.png", transparency=0)
    assert read_image(tmp_path / "palette.png").getpixel((0, 0)) == (255, 255, 255)
    opaque = Image.new("RGBA", (8, 8), (10, 20, 30, 255))
    opaque.save(tmp_path / "opaque.png")
    assert read_image(tmp_path / "opaque.png").getpixel((0, 0)) == (10, 20, 30)


def test_a_dangling_link_in_an_image_folder_is_an_error_naming_it(tmp_path):
    from mmneurons_utils.data.datasets import DatasetError, load_images

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(DatasetError, match=r"b\.png is a broken symbolic link"):
        load_images(tmp_path)


def test_a_deeply_nested_annotation_file_is_one_line(tmp_path):
    from mmneurons_utils.data.coco import DatasetError, read_coco

    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DatasetError, match="nests lists or objects too deeply"):
        read_coco(path)


# --- damaged checkpoints and caches ---------------------------------------------------------------

def _checkpoint(tmp_path):
    from mmneurons_utils.model.embedded import embedded_folder

    ckpt = tmp_path / "ckpt"
    shutil.copytree(embedded_folder("tiny-llava"), ckpt)
    return ckpt


@pytest.mark.parametrize("damage, needles", [
    ("intermediate_size", ["config.json", "intermediate_size"]),
    ("processor", ["processor_config.json", "not valid JSON"]),
    ("tokenizer", ["tokenizer.json"]),
])
def test_a_checkpoint_with_a_broken_file_is_one_line_naming_it(tmp_path, cli, damage, needles):
    ckpt = _checkpoint(tmp_path)
    if damage == "intermediate_size":
        config = json.loads((ckpt / "config.json").read_text())
        config["text_config"]["intermediate_size"] += 8
        (ckpt / "config.json").write_text(json.dumps(config))
    elif damage == "processor":
        (ckpt / "processor_config.json").write_text("{not json")
    else:
        (ckpt / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')   # JSON, not a tokenizer
    code, _, err = cli("describe", "--model", str(ckpt), "--scenes", "1")
    line = _one_line(err, "describe")
    assert code == 2 and all(n in line for n in needles), line


def test_a_damaged_smol_cache_is_said_and_rebuilt_once(tmp_path, monkeypatch, capsys):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmneurons_utils.model import pretrained_lm as P

    gguf = tmp_path / "wheel" / P.GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"a stand-in for the GGUF file")
    builds = []

    def dequantise(path=None):
        builds.append(path)
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=2))

    monkeypatch.setenv("MMNEURONS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "gguf_path", lambda: gguf)
    monkeypatch.setattr(P, "dequantised_language_model", dequantise)
    _, first, digest = P.cached_language_model(verbose=False)
    weights = tmp_path / "cache" / "smollm2" / digest[:16] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])                  # a copy cut short
    config, again, _ = P.cached_language_model(verbose=False)
    assert len(builds) == 2 and "damaged" in capsys.readouterr().err
    assert set(again) == set(first) and all(again[k].shape == first[k].shape for k in first)
    assert config["intermediate_size"] == 16
    third = P.cached_language_model(verbose=False)[1]                # now read from the cache
    assert len(builds) == 2 and all(torch.equal(third[k], again[k]) for k in again)


def test_a_cache_that_stays_damaged_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    from mmneurons_utils.model import pretrained_lm as P

    gguf = tmp_path / P.GGUF_NAME
    gguf.write_bytes(b"x")

    def bad_build(path, digest, folder, weights, config, verbose):
        folder.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # an empty, foreign file
        config.write_text("{}")

    monkeypatch.setenv("MMNEURONS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "gguf_path", lambda: gguf)
    monkeypatch.setattr(P, "_build_cache", bad_build)
    with pytest.raises(P.CacheError, match="model.safetensors does not load"):
        P.cached_language_model(verbose=False)


# --- the atlas page after a crash ---------------------------------------------------------------------

def test_atlas_page_rebuilt_after_a_crash_keeps_its_caption_tooltips(tmp_path, cli):
    out = tmp_path / "atlas"
    argv = ["atlas", "--scenes", "6", "--top-k", "3", "--examples", "2", "--out", str(out)]
    assert cli(*argv)[0] == 0
    page = (out / "index.html").read_text()
    (out / "index.html").unlink()                  # the crash came between parquet and page
    assert cli(*argv)[0] == 0
    assert (out / "index.html").read_text() == page and "title=" in page
    assert not list(out.glob(".*.lock"))
