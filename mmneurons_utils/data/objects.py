"""Which annotated object a caption noun names: singular and plural forms, synonyms, the
category a noun matches, and a sample's boxes for a noun.

A *sample* is anything with ``nouns`` (its object names) and ``boxes`` (``(name, (x0, y0,
x1, y1))`` in pixels): an embedded ``Scene`` or a folder's ``Sample``. Specificity reads
boxes through :func:`boxes_for` and presence through :func:`contains`; the data layer
matches caption nouns to its annotation categories with :func:`match_category`.
"""

from __future__ import annotations

from typing import Iterable

# category → other words a caption may use for it (COCO's names; extend as needed)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "child", "kid", "baby", "people", "lady", "guy",
               "player", "men", "women", "children", "kids"),
    "tv": ("television", "tvs"),
    "airplane": ("plane", "aeroplane", "jet", "aircraft"),
    "motorcycle": ("motorbike",),
    "bicycle": ("bike",),
    "couch": ("sofa",),
    "cell phone": ("phone", "cellphone", "mobile"),
    "dining table": ("table",),
    "potted plant": ("plant",),
    "sports ball": ("ball",),
    "donut": ("doughnut",),
    "hot dog": ("hotdog",),
    "cup": ("mug",),
    "car": ("automobile",),
    "refrigerator": ("fridge",),
    "hair drier": ("dryer", "hairdryer"),
    "teddy bear": ("teddy",),
    "tennis racket": ("racquet",),
    "handbag": ("purse",),
}
# plural → singular where the rules of singular() get it wrong (identity: no singular form)
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person",
              "mice": "mouse", "geese": "goose", "teeth": "tooth", "feet": "foot",
              "knives": "knife", "wives": "wife", "lives": "life", "wolves": "wolf",
              "leaves": "leaf", "shelves": "shelf", "halves": "half", "calves": "calf",
              "loaves": "loaf", "scarves": "scarf", "thieves": "thief",
              "potatoes": "potato", "tomatoes": "tomato", "heroes": "hero", "mangoes": "mango",
              "skis": "ski", "movies": "movie", "cookies": "cookie", "brownies": "brownie",
              "sheep": "sheep", "fish": "fish", "deer": "deer", "species": "species",
              "series": "series", "glasses": "glasses", "scissors": "scissors",
              "pants": "pants", "jeans": "jeans", "shorts": "shorts", "news": "news"}
_PLURAL = {v: k for k, v in _IRREGULAR.items() if k != v}


def singular(word: str) -> str:
    """A plural noun's singular by a few English rules (``dogs`` → ``dog``, ``boxes`` →
    ``box``, ``ponies`` → ``pony``, ``men`` → ``man``); other words unchanged."""
    word = word.lower().strip()
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 4 and word.endswith("ies"):          # ponies → pony (but pies → pie)
        return word[:-3] + "y"
    if word.endswith(("ouses", "auses")):               # houses → house, causes → cause
        return word[:-1]
    if word.endswith(("ches", "shes", "xes", "sses", "zzes", "tzes", "uses")):
        return word[:-2]                                # boxes → box, buses → bus
    if len(word) > 2 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]                                # dogs → dog, sizes → size
    return word


def _plural(word: str) -> str:
    """A singular noun's plural by the same rules (``bus`` → ``buses``, ``pony`` → ``ponies``)."""
    if word in _PLURAL:
        return _PLURAL[word]
    if word in _IRREGULAR:                  # sheep, fish, … (no other form)
        return word
    if word.endswith("y") and len(word) > 2 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    return word + "s"


def match_category(noun: str, categories: Iterable[str]) -> str | None:
    """The category of ``categories`` that ``noun`` names, or ``None``.

    Four passes, each over all categories before the next (case-insensitive): the same word;
    the same singular (:func:`singular` on both sides, or ``noun`` is the category's plural);
    a synonym of :data:`SYNONYMS` (or its singular); the last word of a multi-word category.
    ``match_category("dogs", ["dog"]) == "dog"``; ``match_category("woman", ["person"]) ==
    "person"``; ``match_category("glass", ["wine glass"]) == "wine glass"``.
    """
    word = noun.lower().strip()
    one = singular(word)
    categories = [(category, category.lower().strip()) for category in categories]
    passes = (
        lambda c: word == c,
        lambda c: one == singular(c) or word == _plural(c),
        lambda c: word in SYNONYMS.get(c, ()) or one in {singular(o) for o in SYNONYMS.get(c, ())},
        lambda c: " " in c and one == singular(c.split()[-1]),
    )
    for matches in passes:
        for category, c in categories:
            if matches(c):
                return category
    return None


def candidate_words(categories: Iterable[str]) -> list[str]:
    """Single words a caption may use for ``categories``: each name (a multi-word name: its
    last word), its singular and plural, and its one-word synonyms with theirs — the
    candidate nouns when no tagger is installed (a caption is matched word by word). Every
    word returned names one of ``categories`` by :func:`match_category`."""
    categories = list(categories)
    words = set()
    for category in categories:
        c = category.lower().strip()
        for w in (c.split()[-1] if c else "", *SYNONYMS.get(c, ())):
            if w and " " not in w:
                words |= {w, singular(w), _plural(singular(w))}
    return sorted(w for w in words if match_category(w, categories) is not None)


def boxes_for(sample, noun: str) -> list[tuple[int, int, int, int]]:
    """The boxes of ``sample`` whose object ``noun`` names (exact name, else
    :func:`match_category` against the sample's box names)."""
    names = {name for name, _ in sample.boxes}
    if noun not in names:
        noun = match_category(noun, sorted(names)) or noun
    return [box for name, box in sample.boxes if name == noun]


def contains(sample, noun: str) -> bool:
    """Whether ``noun`` names one of the objects known to be in ``sample``."""
    return noun in sample.nouns or match_category(noun, sample.nouns) is not None
