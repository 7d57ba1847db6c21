"""datasets.py: noun ↔ category matching, COCO reading, and the folder path = the scenes path."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mmneurons_utils.data.datasets import (DatasetError, ImageSet, Sample, load_images, read_coco,
                                           unmatched_nouns, write_image_folder)
from mmneurons_utils.data.objects import SYNONYMS, boxes_for, candidate_words, contains, match_category, singular
from mmneurons_utils.tiny.scenes import NOUNS, make_scenes


# --- words -----------------------------------------------------------------------------------

@pytest.mark.parametrize("plural, one", [
    ("dogs", "dog"), ("boxes", "box"), ("buses", "bus"), ("ponies", "pony"), ("men", "man"),
    ("women", "woman"), ("people", "person"), ("houses", "house"), ("horses", "horse"),
    ("benches", "bench"), ("dishes", "dish"), ("glasses", "glasses"), ("knives", "knife"),
    ("mice", "mouse"), ("pies", "pie"), ("sizes", "size"), ("skis", "ski"), ("Cats", "cat"),
    # already singular: unchanged
    ("glass", "glass"), ("bus", "bus"), ("grass", "grass"), ("cactus", "cactus"),
    ("tennis", "tennis"), ("sheep", "sheep"), ("dog", "dog"),
])
def test_singular(plural, one):
    assert singular(plural) == one


COCO = ["person", "bicycle", "car", "bus", "dog", "cat", "tv", "cell phone", "wine glass",
        "dining table", "fire hydrant", "skis", "house", "mouse"]


@pytest.mark.parametrize("noun, category", [
    ("dog", "dog"), ("dogs", "dog"), ("Dogs", "dog"), ("buses", "bus"), ("houses", "house"),
    ("mice", "mouse"), ("ski", "skis"), ("skis", "skis"),
    ("person", "person"), ("man", "person"), ("woman", "person"), ("people", "person"),
    ("men", "person"), ("children", "person"),
    ("tv", "tv"), ("television", "tv"), ("televisions", "tv"),
    ("bike", "bicycle"), ("bikes", "bicycle"),
    ("phone", "cell phone"), ("phones", "cell phone"), ("cell phone", "cell phone"),
    ("table", "dining table"), ("glass", "wine glass"), ("hydrant", "fire hydrant"),
    ("hydrants", "fire hydrant"),
    ("spaceship", None), ("background", None), ("phonebook", None), ("do", None),
])
def test_match_category(noun, category):
    assert match_category(noun, COCO) == category


def test_match_category_prefers_exact_then_singular_then_synonym():
    assert match_category("man", ["person", "man"]) == "man"          # exact beats synonym
    assert match_category("man", ["man", "person"]) == "man"
    assert match_category("dog", ["dogs", "dog"]) == "dog"            # exact beats singular
    assert match_category("dogs", ["dog", "hot dog"]) == "dog"        # singular beats last word
    assert match_category("phone", ["phone", "cell phone"]) == "phone"
    assert match_category("dog", []) is None
    assert match_category("Person", ["Person"]) == "Person"           # returns the category as given


def test_synonym_table_is_lower_case_and_unambiguous():
    for category, words in SYNONYMS.items():
        assert category == category.lower() and all(w == w.lower() for w in words)
        for w in words:   # each synonym leads back to its own category among all of them
            assert match_category(w, list(SYNONYMS)) == category, (w, category)


def test_candidate_words_are_single_words_that_match_a_category():
    words = candidate_words(["dog", "person", "bus"])
    assert {"dog", "dogs", "person", "people", "man", "men", "woman", "bus", "buses"} <= set(words)
    assert words == sorted(set(words))
    coco = candidate_words(COCO)
    assert {"phone", "phones", "glass", "table", "hydrant", "tv", "television", "ski", "skis"} <= set(coco)
    for w in coco:
        assert " " not in w and match_category(w, COCO) is not None, w
    assert candidate_words([]) == []


def test_boxes_for_and_contains_use_the_matching():
    sample = Sample(Image.new("RGB", (10, 10)), "x.png", ["person", "cell phone"],
                    [("person", (0, 0, 4, 4)), ("person", (5, 5, 9, 9)), ("cell phone", (1, 1, 2, 2))])
    assert boxes_for(sample, "person") == [(0, 0, 4, 4), (5, 5, 9, 9)]
    assert boxes_for(sample, "women") == [(0, 0, 4, 4), (5, 5, 9, 9)]
    assert boxes_for(sample, "phone") == [(1, 1, 2, 2)]
    assert boxes_for(sample, "cat") == []
    assert contains(sample, "man") and contains(sample, "phones") and not contains(sample, "dog")


def test_unmatched_nouns_counts_what_names_no_category(tmp_path):
    data = ImageSet([], "folder", "test", "test", categories=["dog", "person"], has_nouns=True)
    captions = [SimpleNamespace(nouns=["dogs", "frisbee"]), SimpleNamespace(nouns=["man", "frisbee", "park"]),
                SimpleNamespace(nouns=[])]
    assert unmatched_nouns(captions, data) == {"frisbee": 2, "park": 1}
    assert list(unmatched_nouns(captions, data)) == ["frisbee", "park"]    # most frequent first
    bare = ImageSet([], "folder", "test", "test")
    assert unmatched_nouns(captions, bare) == {}                            # nothing to match against


# --- COCO files ------------------------------------------------------------------------------

def _coco(images=None, annotations=None, categories=None):
    return dict(images=[dict(id=1, file_name="a.png", width=8, height=8)] if images is None else images,
                annotations=([dict(id=1, image_id=1, category_id=3, bbox=[1, 2, 3, 4])]
                             if annotations is None else annotations),
                categories=[dict(id=3, name="dog")] if categories is None else categories)


def _write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_read_coco_reads_sizes_boxes_and_categories(tmp_path):
    data = _coco(categories=[dict(id=3, name="dog"), dict(id=4, name="cat")])
    data["images"].append(dict(id=2, file_name="b.png"))   # no size: boxes in the file's pixels
    labels, categories = read_coco(_write(tmp_path / "a.json", data))
    assert categories == ["cat", "dog"]
    assert labels == {"a.png": ((8, 8), [("dog", [1.0, 2.0, 3.0, 4.0])]), "b.png": (None, [])}


@pytest.mark.parametrize("content, needles", [
    ("{not json", ["is not JSON"]),
    ([1, 2], ["COCO instances", "images, annotations, categories"]),
    (dict(images=[], annotations=[]), ["categories"]),
    (_coco(annotations=[dict(id=1, image_id=1, category_id=3)]), ["annotations[0]", "'bbox'"]),
    (_coco(annotations=[dict(id=1, image_id=1, category_id=9, bbox=[0, 0, 1, 1])]),
     ["category_id 9", "annotations[0]"]),
    (_coco(annotations=[dict(id=1, image_id=7, category_id=3, bbox=[0, 0, 1, 1])]),
     ["image_id 7", "annotations[0]"]),
    (_coco(annotations=[dict(id=1, image_id=1, category_id=3, bbox=[0, 0, 1])]), ["bbox", "[x, y, width, height]"]),
    (_coco(annotations=[dict(id=1, image_id=1, category_id=3, bbox=[0, 0, -1, 1])]), ["bbox", "≥ 0"]),
    (_coco(images=[dict(id=1, width=8, height=8)]), ["images[0]", "'file_name'"]),
    (_coco(images=[dict(id=1, file_name="a.png", width=0, height=8)]), ["width/height", "a.png"]),
    (_coco(categories=[dict(id=3)]), ["categories[0]", "'name'"]),
])
def test_read_coco_errors_name_the_problem(tmp_path, content, needles):
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(DatasetError) as info:
        read_coco(path)
    message = str(info.value)
    assert "bad.json" in message and "\n" not in message
    for needle in needles:
        assert needle in message


def test_read_coco_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_coco(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="cannot be read"):
        read_coco(tmp_path)   # a folder


# --- load_images -----------------------------------------------------------------------------

def _pixels(image):
    return np.asarray(image.convert("RGB"))


def test_scenes_path():
    data = load_images(n=5, seed=2)
    scenes = make_scenes(5, seed=2)
    assert data.kind == "scenes" and data.has_boxes and data.has_nouns and data.has_captions
    assert data.categories == list(NOUNS) and data.notes == []
    assert [s.caption for s in data] == [s.caption for s in scenes]
    assert data.names == [f"scene-2-{i}" for i in range(5)]
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(data.images, [s.image for s in scenes]))
    assert len(load_images()) == 24
    assert "object boxes: yes" in data.summary()


def test_folder_of_scenes_gives_the_scenes_back(tmp_path):
    scenes = make_scenes(6, seed=3)
    write_image_folder(scenes, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations.json"] + [f"image_{i:04d}.png" for i in range(6)]
    data = load_images(tmp_path, tmp_path / "annotations.json")
    assert data.kind == "folder" and data.has_boxes and data.has_nouns and not data.has_captions
    assert data.names == [f"image_{i:04d}.png" for i in range(6)] and data.notes == []
    assert set(data.categories) == {n for s in scenes for n in s.nouns}
    for sample, scene in zip(data, scenes):
        assert np.array_equal(_pixels(sample.image), _pixels(scene.image))      # PNG is lossless
        assert sample.boxes == scene.boxes                                      # names and pixels, via xywh
        assert set(sample.nouns) == set(scene.nouns) and sample.caption is None
    assert data.candidate_nouns() == candidate_words(data.categories)
    assert "object boxes: yes" in data.summary()


def test_write_image_folder_can_list_every_category(tmp_path):
    write_image_folder(make_scenes(2, seed=0), tmp_path, categories=list(NOUNS))
    data = load_images(tmp_path, tmp_path / "annotations.json")
    assert set(data.categories) == set(NOUNS) == set(load_images(n=2).categories)
    with pytest.raises(DatasetError, match="categories lacks"):
        write_image_folder(make_scenes(2, seed=0), tmp_path / "new", categories=["spaceship"])


def test_boxes_scale_when_the_annotated_size_differs(tmp_path):
    scenes = make_scenes(3, seed=5)
    write_image_folder(scenes, tmp_path)
    coco = json.loads((tmp_path / "annotations.json").read_text())
    for im in coco["images"]:          # annotated at twice the size, same box numbers: boxes halve
        im["width"], im["height"] = 2 * im["width"], 2 * im["height"]
    _write(tmp_path / "half.json", coco)
    half = load_images(tmp_path, tmp_path / "half.json")
    for sample, scene in zip(half, scenes):
        expected = [(n, (x0 // 2, y0 // 2, -(-x1 // 2), -(-y1 // 2))) for n, (x0, y0, x1, y1) in scene.boxes]
        assert sample.boxes == expected
    for a in coco["annotations"]:      # twice the size and twice the boxes: the scenes' boxes exactly
        a["bbox"] = [2 * v for v in a["bbox"]]
    _write(tmp_path / "double.json", coco)
    double = load_images(tmp_path, tmp_path / "double.json")
    assert [s.boxes for s in double] == [s.boxes for s in scenes]


def test_boxes_are_clipped_to_the_image(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    _write(tmp_path / "a.json", _coco(annotations=[
        dict(id=1, image_id=1, category_id=3, bbox=[-2, 5, 20, 20]),
        dict(id=2, image_id=1, category_id=3, bbox=[30, 30, 5, 5])]))
    data = load_images(tmp_path, tmp_path / "a.json")
    boxes = [box for _, box in data[0].boxes]
    assert boxes == [(0, 5, 8, 8)]          # clipped to the image; the box outside it is dropped
    assert any("outside" in n and "annotations[1]" in n for n in data.notes), data.notes
    assert any("clipped" in n and "annotations[0]" in n for n in data.notes), data.notes


def test_folder_without_annotations_has_no_labels(tmp_path):
    write_image_folder(make_scenes(3, seed=1), tmp_path, annotations=False)
    assert not (tmp_path / "annotations.json").exists()
    data = load_images(tmp_path)
    assert len(data) == 3 and data.kind == "folder"
    assert not data.has_boxes and not data.has_nouns and data.categories == []
    assert all(s.boxes == [] and s.nouns == [] and s.caption is None for s in data)
    assert "mass in box and pointing are skipped" in data.summary()
    assert data.candidate_nouns() == []


def test_n_takes_the_first_files_by_name_and_reads_only_those(tmp_path):
    for name, shade in [("b.png", 20), ("a.jpg", 10), ("c.png", 30)]:
        Image.new("RGB", (4, 4), (shade, shade, shade)).save(tmp_path / name)
    (tmp_path / "z.png").write_bytes(b"not an image")       # never read with n=2
    (tmp_path / "._a.jpg").write_bytes(b"macOS resource fork")  # hidden: left out
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_images(tmp_path, n=2)
    assert data.names == ["a.jpg", "b.png"]
    assert [int(_pixels(s.image)[0, 0, 0]) for s in data] == [10, 20]
    with pytest.raises(DatasetError, match="z.png"):   # all of them: the broken file is named
        load_images(tmp_path)


def test_an_image_without_an_entry_gets_a_note(tmp_path):
    scenes = make_scenes(3, seed=2)
    write_image_folder(scenes, tmp_path)
    scenes[0].image.save(tmp_path / "zz_extra.png")   # sorts last
    data = load_images(tmp_path, tmp_path / "annotations.json")
    assert data.names[-1] == "zz_extra.png" and data[-1].boxes == [] and data[-1].nouns == []
    assert "1 image(s) have no entry in annotations.json" in data.summary()
    assert data[0].boxes == scenes[0].boxes


def test_file_names_with_a_folder_match_by_base_name(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    _write(tmp_path / "a.json", _coco(images=[dict(id=1, file_name="val2017/a.png", width=16, height=16)]))
    assert load_images(tmp_path, tmp_path / "a.json")[0].boxes == [("dog", (0, 1, 2, 3))]


def test_slices_keep_the_labels(tmp_path):
    data = load_images(n=6, seed=1)
    part = data[2:4]
    assert isinstance(part, ImageSet) and part.kind == "scenes" and part.has_boxes
    assert part.categories == data.categories and part.names == ["scene-1-2", "scene-1-3"]
    assert part.key != data.key
    assert data[0] is list.__getitem__(data, 0)


@pytest.mark.parametrize("make, call, needle", [
    (lambda d: None, lambda d: load_images(d / "missing"), "is not a folder"),
    (lambda d: None, lambda d: load_images(d), "holds no images"),
    (lambda d: (d / "notes.txt").write_text("hi"), lambda d: load_images(d), "holds no images"),
    (lambda d: (d / "broken.jpg").write_bytes(b"xx"), lambda d: load_images(d), "broken.jpg"),
    (lambda d: None, lambda d: load_images(annotations=d / "a.json"), "without an image folder"),
    (lambda d: None, lambda d: load_images(n=0), "positive integer"),
    (lambda d: Image.new("RGB", (4, 4)).save(d / "x.png"),
     lambda d: load_images(d, d / "missing.json"), "does not exist"),
    (lambda d: (Image.new("RGB", (4, 4)).save(d / "x.png"), _write(d / "a.json", _coco())),
     lambda d: load_images(d, d / "a.json"), "none of the 1 images"),
])
def test_bad_inputs_raise_dataset_error(tmp_path, make, call, needle):
    make(tmp_path)
    with pytest.raises(DatasetError) as info:
        call(tmp_path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_write_image_folder_refuses_a_used_path(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not empty"):
        write_image_folder(make_scenes(1), tmp_path)
    with pytest.raises(DatasetError, match="not a folder"):
        write_image_folder(make_scenes(1), tmp_path / "keep.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
