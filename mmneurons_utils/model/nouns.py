"""Which words of a caption are nouns, and which generated token starts each.

* Embedded models: their own noun vocabulary (``VLM.noun_vocabulary``, read from the
  marker file beside their weights).
* Real models: spaCy's POS tagger when spaCy and an English model are installed
  (``pip install spacy && python -m spacy download en_core_web_sm``), otherwise a
  clear :class:`NounTaggerMissing` error; pass ``nouns=[...]`` yourself instead.

A noun that the tokenizer splits into several sub-tokens is represented by its
**first** sub-token at its **first** occurrence in the caption, as the paper's
official code does; :func:`locate_nouns` returns that generation step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence


class NounTaggerMissing(RuntimeError):
    """No POS tagger is installed and no noun list was given."""


@dataclass(frozen=True)
class NounToken:
    noun: str
    step: int       # index into the generated tokens: the step whose logits produce it
    token_id: int   # the noun's first sub-token


def vocabulary_nouns(text: str, vocabulary: Iterable[str]) -> list[str]:
    """Nouns of ``vocabulary`` in ``text``, in order of first appearance, no repeats."""
    vocab = set(vocabulary)
    seen: list[str] = []
    for word in re.findall(r"[A-Za-z]+", text.lower()):
        if word in vocab and word not in seen:
            seen.append(word)
    return seen


NOUN_TAGS = ("NN", "NNS")              # the official code's nouns
PROPER_NOUN_TAGS = ("NNP", "NNPS")


def tagged_nouns(text: str, proper: bool = False) -> list[str]:
    """Nouns found by spaCy's tagger (first appearance, lower case, no repeats): Penn tags
    NN and NNS, as the official code keeps them, plus NNP / NNPS when ``proper``."""
    try:
        import spacy
    except ImportError as exc:
        raise NounTaggerMissing(
            "finding nouns in a real model's caption needs spaCy with an English model "
            "(pip install spacy && python -m spacy download en_core_web_sm), "
            "or pass nouns=[...] yourself (or candidate nouns, e.g. an annotation file's categories)") from exc
    nlp = _spacy_model(spacy)
    tags = NOUN_TAGS + (PROPER_NOUN_TAGS if proper else ())
    seen: list[str] = []
    for token in nlp(text):
        word = token.text.lower()
        if token.tag_ in tags and word not in seen:
            seen.append(word)
    return seen


def tagger_available() -> bool:
    """Whether spaCy and its English model can be loaded (the tagger path of ``nouns_of``)."""
    try:
        import spacy
        _spacy_model(spacy)
    except (ImportError, NounTaggerMissing):
        return False
    return True


_SPACY = {}


def _spacy_model(spacy):
    if "nlp" not in _SPACY:
        try:
            _SPACY["nlp"] = spacy.load("en_core_web_sm", disable=["parser", "ner", "lemmatizer"])
        except OSError as exc:
            raise NounTaggerMissing(
                "spaCy is installed but its English model is not "
                "(python -m spacy download en_core_web_sm); or pass nouns=[...] yourself") from exc
    return _SPACY["nlp"]


def locate_nouns(tokenizer, token_ids: Sequence[int], nouns: Sequence[str]) -> list[NounToken]:
    """The generation step and first sub-token of each noun's first occurrence.

    Nouns that do not occur as a whole word in the decoded caption are skipped.
    """
    ids = list(token_ids)
    # character end of the decoded text after each token: token j covers [ends[j-1], ends[j])
    ends = [len(tokenizer.decode(ids[: j + 1], skip_special_tokens=True)) for j in range(len(ids))]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    found = []
    for noun in nouns:
        match = _whole_word(noun).search(text)
        if match is None:
            continue
        step = next(j for j, end in enumerate(ends) if end > match.start())
        found.append(NounToken(noun=noun, step=step, token_id=ids[step]))
    return found


def _whole_word(word: str) -> re.Pattern:
    """``word`` as a whole word, case-insensitive (letters may not touch it on either side)."""
    return re.compile(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", re.IGNORECASE)


def says(text: str, noun: str) -> bool:
    """Whether ``noun`` occurs in ``text`` as a whole word (case-insensitive): the one noun
    match behind "the caption still says it" in ablation, editing and the widgets."""
    return _whole_word(noun).search(text) is not None


def noun_token_id(tokenizer, noun: str) -> int:
    """The id of ``noun``'s first sub-token as a caption writes it after a word (``"a dog"``:
    byte-level BPE's ``Ġdog``, sentencepiece's ``▁dog``, a word-level vocabulary's ``dog``)."""
    head = tokenizer("a", add_special_tokens=False)["input_ids"]
    ids = tokenizer(f"a {noun}", add_special_tokens=False)["input_ids"]
    if len(ids) <= len(head) or ids[:len(head)] != head:
        raise ValueError(f"cannot tokenize the noun {noun!r} after 'a' with this tokenizer")
    return int(ids[len(head)])
