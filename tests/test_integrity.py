"""Nothing lost, nothing mixed (issue 21): result files that know what they hold, images read
as a viewer shows them, bad input refused in one line before any work. Every bad file is
written here."""

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

FIND = ["find", "--model", "tiny-llava", "--top-k", "5"]


def _error_line(err: str, command: str) -> str:
    """The one error line of a failed command (progress bars and notes aside)."""
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"mmneurons {command}: error:"), errors[0]   # not glued to a bar
    return errors[0]


def _last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def _scene_folder(path, n=3, seed=0):
    from mmneurons_utils import make_scenes
    from mmneurons_utils.data.datasets import write_image_folder

    return write_image_folder(make_scenes(n, seed=seed), path)


# --- result files: resume, refuse, never mix ----------------------------------------------------

def test_a_rerun_with_other_settings_is_refused_and_never_returns_stale_rows(tmp_path, cli):
    out = tmp_path / "s.parquet"
    code, stdout, _ = cli(*FIND, "--scenes", "3", "--out", str(out), "--json")
    assert code == 0 and _last_json(stdout)["n_new"] == 3
    table = pd.read_parquet(out)
    assert set(table["model"]) == {"tiny-llava"}                   # the model is a column
    before = out.read_bytes()
    for change, needle in ((["--top-k", "10"], "top_k 5 → 10"),
                           (["--method", "random"], "method 'contribution' → 'random'"),
                           (["--dtype", "bfloat16"], "dtype 'float32' → 'bfloat16'")):
        argv = [*FIND, "--scenes", "4", "--out", str(out), "--json", *change]
        code, stdout, err = cli(*argv)
        line = _error_line(err, "find")
        assert code == 2 and needle in line and "another --out" in line, line
        assert out.read_bytes() == before                            # nothing appended, nothing rewritten
    # the same settings resume: only the new scene is computed, every row is of top-k 5
    code, stdout, _ = cli(*FIND, "--scenes", "4", "--out", str(out), "--json")
    summary = _last_json(stdout)
    assert code == 0 and summary["n_new"] == 1 and summary["n_skipped"] == 3
    assert (pd.read_parquet(out).groupby(["image_id", "noun"]).size() == 5).all()


def test_changed_images_under_the_same_names_are_refused(tmp_path, cli):
    from mmneurons_utils import make_scenes

    folder = _scene_folder(tmp_path / "photos", n=2, seed=4)
    out = tmp_path / "r.parquet"
    assert cli(*FIND, "--images", str(folder), "--out", str(out))[0] == 0
    before = out.read_bytes()
    make_scenes(1, seed=99)[0].image.save(folder / "image_0001.png")      # other pixels, same name
    code, _, err = cli(*FIND, "--images", str(folder), "--out", str(out))
    line = _error_line(err, "find")
    assert code == 2 and "image_0001.png" in line and "other contents" in line
    assert out.read_bytes() == before
    # the same pictures in another folder are the same images: resumed, nothing recomputed
    shutil.rmtree(folder)
    _scene_folder(tmp_path / "copy", n=2, seed=4)
    code, stdout, _ = cli(*FIND, "--images", str(tmp_path / "copy"), "--out", str(out), "--json")
    assert code == 0 and _last_json(stdout)["n_new"] == 0


@pytest.mark.parametrize("kind", ["user table", "atlas table", "older find file"])
def test_a_parquet_find_did_not_write_is_left_byte_identical(tmp_path, cli, kind):
    out = tmp_path / "mine.parquet"
    if kind == "user table":
        pd.DataFrame({"image_id": ["x", "y"], "count": [1, 2]}).to_parquet(out)
        needle = "mmneurons find did not write"
    elif kind == "atlas table":
        from mmneurons_utils.atlas.build import write_atlas

        write_atlas(pd.DataFrame({"noun": ["dog"], "layer": [1]}), out, meta={"description": {}})
        needle = "atlas table"
    else:                       # the done list of an earlier version, no settings recorded
        from mmneurons_utils.store.results import write_parquet

        write_parquet(pd.DataFrame({"image_id": ["scene-0-0"], "rank": [0]}), out,
                      {b"mmneurons_done_images": b'["scene-0-0"]'})
        needle = "did not record its settings"
    before = out.read_bytes()
    code, _, err = cli(*FIND, "--scenes", "2", "--out", str(out))
    assert code == 2 and needle in _error_line(err, "find")
    assert out.read_bytes() == before


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import pandas as pd
    from mmneurons_utils.store.results import ResultFile, exclusive

    out, names, role = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    if role == "second":                 # it is about to ask for the lock the first one holds
        Path(out + ".second").touch()
    with exclusive(out):
        if role == "first":              # hold the lock until the second one is waiting for it
            Path(out + ".holding").touch()
            deadline = time.time() + 60
            while not Path(out + ".second").exists() and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
        results = ResultFile(out)
        results.expect({"method": "contribution"}, {n: "h-" + n for n in names})
        for name in names:
            if name in results.done:
                continue
            time.sleep(0.2)
            results.append(pd.DataFrame({"image_id": [name] * 2, "rank": [0, 1]}), [name])
""")


def test_two_concurrent_writers_lose_no_rows(tmp_path):
    """Two writers of one output at once (overlapping image lists): the second waits for the
    first and then adds only what is missing; every image's rows are there once."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    out = tmp_path / "r.parquet"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, str(script), str(out), "a,b,c,d", "first"], env=env,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120          # the second starts once the first holds the lock
    while not Path(str(out) + ".holding").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    second = subprocess.Popen([sys.executable, str(script), str(out), "c,d,e,f", "second"], env=env,
                              stderr=subprocess.PIPE, text=True)
    errors = [p.communicate(timeout=120)[1] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, errors
    table = pd.read_parquet(out)
    assert sorted(table["image_id"]) == sorted([n for n in "abcdef" for _ in range(2)])
    from mmneurons_utils.store.results import ResultFile

    assert sorted(ResultFile(out).done) == list("abcdef")
    assert "being written by another run" in "".join(errors)           # the one that waited said so


def test_stale_temporary_files_of_a_killed_run_are_removed(tmp_path):
    from mmneurons_utils.store.results import ResultFile

    out = tmp_path / "r.parquet"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".r.parquet.{dead}.tmp"
    stale.write_bytes(b"half a parquet file")
    alive = tmp_path / f".r.parquet.{os.getppid()}.tmp"        # a live writer's: left alone
    alive.write_bytes(b"being written")
    ResultFile(out).append(pd.DataFrame({"image_id": ["a"]}), ["a"])
    assert not stale.exists() and alive.exists()


# --- the atlas folder --------------------------------------------------------------------------

def test_atlas_never_overwrites_a_page_it_did_not_write(tmp_path, cli):
    out = tmp_path / "atlas"
    out.mkdir()
    (out / "index.html").write_text("<html>my own page</html>")
    code, _, err = cli("atlas", "--scenes", "4", "--top-k", "2", "--examples", "2", "--out", str(out))
    assert code == 2 and "index.html" in _error_line(err, "atlas")
    assert (out / "index.html").read_text() == "<html>my own page</html>"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["index.html"]


def test_atlas_refuses_replaced_images_and_names_examples_by_file(tmp_path, cli):
    from mmneurons_utils import make_scenes

    folder = _scene_folder(tmp_path / "photos", n=4, seed=2)
    out = tmp_path / "atlas"
    argv = ["atlas", "--images", str(folder), "--top-k", "3", "--examples", "2", "--out", str(out),
            "--json"]
    code, stdout, err = cli(*argv)
    assert code == 0, err
    page = (out / "index.html").read_text()
    assert "alt='image_000" in page and "alt='image " not in page       # by file, not "image 3"
    assert cli(*argv)[0] == 0                                            # unchanged: reused
    make_scenes(1, seed=77)[0].image.save(folder / "image_0002.png")   # replaced, same name
    before = (out / "atlas.parquet").read_bytes()
    code, _, err = cli(*argv)
    assert code == 2 and "images" in _error_line(err, "atlas")
    assert (out / "atlas.parquet").read_bytes() == before


# --- images as a viewer shows them -------------------------------------------------------------

def _caption(vlm, image):
    return vlm.describe([image])[0].text


def test_an_exif_rotated_jpeg_captions_like_its_upright_copy(tmp_path, tiny_llava):
    from mmneurons_utils import make_scenes
    from mmneurons_utils.data.images import read_image

    scene = next(s for s in make_scenes(12, seed=6) if len(s.nouns) >= 2)   # left/right order matters
    upright = scene.image
    upright.save(tmp_path / "upright.jpg", quality=100, subsampling=0)
    exif = Image.Exif()
    exif[0x0112] = 6        # orientation: stored rotated, shown turned 90° clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.jpg", quality=100,
                                                       subsampling=0, exif=exif)
    shown = read_image(tmp_path / "rotated.jpg")
    assert shown.size == upright.size
    assert np.abs(np.asarray(shown, float) - np.asarray(upright, float)).mean() < 4     # JPEG noise only
    assert _caption(tiny_llava, shown) == _caption(tiny_llava, read_image(tmp_path / "upright.jpg"))
    assert _caption(tiny_llava, shown) == _caption(tiny_llava, upright)


def test_a_16_bit_png_captions_like_its_8_bit_copy(tmp_path, tiny_llava):
    from mmneurons_utils import make_scenes
    from mmneurons_utils.data.images import read_image

    gray = make_scenes(1, seed=3)[0].image.convert("L")
    gray.save(tmp_path / "eight.png")
    sixteen = np.asarray(gray, dtype=np.uint16) * 257             # 0 … 255 → 0 … 65535
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    a, b = read_image(tmp_path / "sixteen.png"), read_image(tmp_path / "eight.png")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))    # scaled, not clipped to white
    assert _caption(tiny_llava, a) == _caption(tiny_llava, b)
    # the Python API reads an in-memory 16-bit image the same way
    assert _caption(tiny_llava, Image.open(tmp_path / "sixteen.png")) == _caption(tiny_llava, b)


def _png_header_only(path, width, height):
    """A PNG whose header claims ``width × height`` pixels (a decompression bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_in_one_line_naming_file_and_limit(tmp_path, cli):
    _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    code, _, err = cli("describe", "--images", str(tmp_path))
    line = _error_line(err, "describe")
    assert code == 2 and "bomb.png" in line and f"{Image.MAX_IMAGE_PIXELS:,}" in line


# --- check before working ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["find", "--scenes", "2", "--method", "bogus", "--out", "{tmp}/r.parquet"], "contribution, gradient"),
    (["find", "--scenes", "2", "--out", "{tmp}"], "is a folder"),
    (["find", "--scenes", "2", "--out", "{tmp}/no/such/r.parquet"], "does not exist"),
    (["describe", "--scenes", "2", "--device", "meta"], "meta"),
    (["find", "--scenes", "2", "--device", "meta", "--out", "{tmp}/r.parquet"], "meta"),
    (["perturb", "--scenes", "2", "--sigma", "inf"], "finite positive"),
    (["perturb", "--scenes", "2", "--sigma", "nan"], "finite positive"),
    (["edit", "--source", "a", "--target", "cat", "--scenes", "4"], "must be a noun"),
    (["edit", "--source", "dog", "--target", "cat", "--scenes", "4", "--save", "{tmp}/file.txt"],
     "not a folder"),
])
def test_bad_input_is_refused_before_the_model_loads(tmp_path, cli, argv, needle, monkeypatch):
    import importlib

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    # every module that binds load_vlm by name: the commands call it from there
    for name in ("model.vlm", "commands.common", "commands.find", "commands.interventions"):
        monkeypatch.setattr(importlib.import_module(f"mmneurons_utils.{name}"), "load_vlm", no_loading)
    (tmp_path / "file.txt").write_text("x")
    code, _, err = cli(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2 and needle in _error_line(err, argv[0])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_work(tmp_path, cli):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    code, _, err = cli(*FIND, "--scenes", "2", "--out", str(folder / "r.parquet"))
    assert code == 2 and "not writable" in _error_line(err, "find")


def test_the_edit_source_must_be_a_noun_the_captions_say(cli):
    # "image" is in every caption ("An image of …") but is no noun of the model
    code, _, err = cli("edit", "--source", "image", "--target", "cat", "--scenes", "4")
    assert code == 2 and "must be a noun" in _error_line(err, "edit")


@pytest.mark.parametrize("damage, needle", [
    ("config", "config.json"), ("processor", "image processor"), ("weights", "no weights file"),
    ("truncated", "model.safetensors"), ("tokenizer", "tokenizer"),
])
def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, cli, damage, needle):
    from mmneurons_utils.model.embedded import embedded_folder

    ckpt = tmp_path / "ckpt"
    shutil.copytree(embedded_folder("tiny-llava"), ckpt)
    if damage == "config":
        (ckpt / "config.json").write_text('{"model_type": "llava",')
    elif damage == "processor":
        (ckpt / "processor_config.json").unlink()
    elif damage == "weights":
        (ckpt / "model.safetensors").unlink()
    elif damage == "tokenizer":
        (ckpt / "tokenizer.json").unlink()
    else:
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = cli("describe", "--model", str(ckpt), "--scenes", "1")
    assert code == 2 and needle in _error_line(err, "describe")


# --- annotations -------------------------------------------------------------------------------

def _coco(images, annotations, categories=({"id": 1, "name": "dog"},)):
    return {"images": list(images), "annotations": list(annotations), "categories": list(categories)}


def _image_entry(i, name, size=64):
    return {"id": i, "file_name": name, "width": size, "height": size}


@pytest.mark.parametrize("coco, needles", [
    (_coco([_image_entry(1, "image_0000.png"), _image_entry(1, "image_0001.png")], []),
     ["images[1]", "images[0]", "same id 1"]),
    (_coco([_image_entry([1], "image_0000.png")], []), ["id of images[0]", "[1]"]),
    (_coco([_image_entry(1, "image_0000.png")],
           [{"id": 1, "image_id": 1, "category_id": [1], "bbox": [0, 0, 4, 4]}]),
     ["category_id of annotations[0]"]),
    (_coco([_image_entry(1, "image_0000.png")], [], [{"id": 1, "name": "dog"}, {"id": 1, "name": "cat"}]),
     ["categories[1]", "same id"]),
    (_coco([_image_entry(1, "image_0000.png")],
           [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1e308, 0, 1e308, 4]}]),
     ["bbox of annotations[0]", "finite"]),
])
def test_annotation_errors_name_the_entry(tmp_path, coco, needles):
    from mmneurons_utils.data.datasets import DatasetError, load_images

    folder = _scene_folder(tmp_path / "photos", n=2)
    (folder / "bad.json").write_text(json.dumps(coco))
    with pytest.raises(DatasetError) as info:
        load_images(folder, folder / "bad.json")
    assert "\n" not in str(info.value) and "bad.json" in str(info.value)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_annotation_problems_that_leave_it_usable_are_one_line_notes(tmp_path, cli):
    folder = _scene_folder(tmp_path / "photos", n=2)
    coco = _coco([_image_entry(1, "image_0000.png"), _image_entry(2, "image_0001.png"),
                  _image_entry(3, "gone.png")],
                 [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 9]},       # zero width
                  {"id": 2, "image_id": 1, "category_id": 1, "bbox": [1e308, 0, 4, 4]},    # outside
                  {"id": 3, "image_id": 2, "category_id": 1, "bbox": [60, 60, 1e300, 10]}, # clipped
                  {"id": 4, "image_id": 2, "category_id": 1, "bbox": [1, 1, 8, 8]}],
                 [{"id": 1, "name": "dog"}, {"id": 2, "name": "zeppelin"}])
    # with a UTF-8 byte-order mark, as some editors save JSON
    (folder / "ann.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(coco).encode())
    from mmneurons_utils.data.datasets import load_images

    data = load_images(folder, folder / "ann.json")
    assert data[0].boxes == [] and data[1].boxes == [("dog", (60, 60, 64, 64)), ("dog", (1, 1, 9, 9))]
    notes = " | ".join(data.notes)
    for needle in ("zero-size", "annotations[0]", "outside", "annotations[1]", "clipped",
                   "annotations[2]", "gone.png"):
        assert needle in notes, notes
    code, stdout, err = cli("describe", "--images", str(folder), "--annotations", str(folder / "ann.json"))
    assert code == 0, err
    note_lines = [line for line in err.splitlines() if "note:" in line]
    assert len(note_lines) == len(data.notes) + 1 and "zeppelin" in note_lines[-1]


# --- what --save writes ------------------------------------------------------------------------

def test_saved_folders_follow_the_umask(tmp_path):
    import tempfile

    from mmneurons_utils.store.results import respect_umask

    old = os.umask(0o022)
    try:
        folder = tempfile.mkdtemp(dir=tmp_path)          # what save_pretrained writes into
        (tmp_path / folder / "weights.bin").write_bytes(b"x")
        os.chmod(tmp_path / folder / "weights.bin", 0o600)
        respect_umask(folder)
    finally:
        os.umask(old)
    assert os.stat(folder).st_mode & 0o777 == 0o755
    assert os.stat(os.path.join(folder, "weights.bin")).st_mode & 0o777 == 0o644
