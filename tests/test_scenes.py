import numpy as np
import pytest

from mmneurons_utils.tiny.scenes import (BACKGROUNDS, NOUNS, TRAIN_SEED_BASE, caption_for, make_scene,
                                    make_scenes)


def test_same_seed_same_scenes_and_different_seeds_differ():
    a, b = make_scenes(20, seed=3), make_scenes(20, seed=3)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    c = make_scenes(20, seed=4)
    assert [s.caption for s in a] != [s.caption for s in c]


def test_scene_i_depends_only_on_seed_and_index():
    many = make_scenes(10, seed=7)
    assert make_scene(7, 9).caption == many[9].caption


def test_captions_follow_the_grammar_and_list_objects_left_to_right():
    for scene in make_scenes(200, seed=0):
        assert 1 <= len(scene.nouns) <= 3
        assert len(set(scene.nouns)) == len(scene.nouns)
        assert scene.caption == caption_for(scene.nouns, scene.background)
        centres = [(b[0] + b[2]) / 2 for _, b in scene.boxes]
        assert centres == sorted(centres)
        assert [n for n, _ in scene.boxes] == scene.nouns


def test_boxes_cover_the_drawn_glyph_and_nothing_else():
    for scene in make_scenes(50, seed=1):
        pixels = np.asarray(scene.image).astype(int)
        background = np.array(BACKGROUNDS[scene.background])
        changed = np.abs(pixels - background).sum(-1) > 0
        inside = np.zeros_like(changed)
        for _, (x0, y0, x1, y1) in scene.boxes:
            assert 0 <= x0 < x1 <= scene.image.width and 0 <= y0 < y1 <= scene.image.height
            assert changed[y0:y1, x0:x1].any()
            inside[y0:y1, x0:x1] = True
        assert not (changed & ~inside).any()


def test_vocabulary_is_large_and_nouns_are_single_words():
    assert len(NOUNS) >= 40
    assert all(n.isalpha() and n.islower() for n in NOUNS)
    assert caption_for(["apple", "dog", "elephant"], "blue") == \
        "an apple, a dog and an elephant on a blue background"


def test_seed_ranges_are_documented_and_disjoint():
    assert TRAIN_SEED_BASE == 10_000


@pytest.mark.parametrize("n", [0, -1, 1.5, "3", True])
def test_bad_n_is_rejected(n):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        make_scenes(n)


@pytest.mark.parametrize("seed", [-1, 2.0, "x"])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        make_scenes(2, seed=seed)


@pytest.mark.slow
def test_one_two_and_three_objects_are_about_equally_common():
    from collections import Counter

    counts = Counter(len(s.nouns) for s in make_scenes(600, seed=0))
    assert all(150 <= counts[k] <= 250 for k in (1, 2, 3))
