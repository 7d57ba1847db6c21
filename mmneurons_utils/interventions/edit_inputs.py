"""What an edit acts on: the target's token, the step that says the source in each caption,
and the units — given (checked, each once) or chosen by a method's score summed over the edit
images. Bad input is an :class:`~.edit_learning.EditInputError` that lists the choices."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..method import scoring
from ..method.identify import logit_weights, unit_scores
from ..model.nouns import NounToken, locate_nouns
from .ablation import as_units
from .edit_learning import UNIT_CHOICES, EditConfig, EditInputError


def target_token(vlm, word: str) -> int:
    """The single token id of ``word`` as a caption says it (after a space: ``Ġcat`` for a
    byte-level BPE, not ``cat``); ``EditInputError`` listing the choices otherwise."""
    vocabulary = vlm.noun_vocabulary
    if vocabulary is not None and word not in vocabulary:
        raise EditInputError(f"target {word!r} is not in the model's noun vocabulary; choose one "
                             f"of: {', '.join(sorted(vocabulary))}")
    ids = vlm.tokenizer.encode(f"a {word}", add_special_tokens=False)
    found = locate_nouns(vlm.tokenizer, ids, [word])
    ids = ids[found[0].step:] if found else ids
    unk = vlm.tokenizer.unk_token_id
    if len(ids) != 1 or (unk is not None and ids[0] == unk):
        pieces = vlm.tokenizer.convert_ids_to_tokens(ids)
        raise EditInputError(f"target {word!r} is not one token of the vocabulary (it becomes "
                             f"{pieces}); choose a word the tokenizer keeps whole")
    return int(ids[0])


def source_steps(vlm, captions, source: str) -> list[int]:
    """The step of ``source``'s first sub-token in each caption; error listing what was said."""
    steps, missing = [], []
    for i, caption in enumerate(captions):
        found = locate_nouns(vlm.tokenizer, caption.token_ids, [source])
        if not found:
            missing.append(i)
        else:
            steps.append(found[0].step)
    if missing:
        said = sorted({n for c in captions for n in c.nouns})
        raise EditInputError(
            f"source {source!r} is not in the caption of image(s) {missing} "
            f"({captions[missing[0]].text!r}); nouns said: {', '.join(said) or '(none)'}")
    return steps


def choose_units(vlm, captions, steps: Sequence[int], source_id: int, k: int,
                 method: str = "contribution", seed: int = 0, images: Sequence = ()) -> np.ndarray:
    """``Int[ndarray, "K 2"]``: the top-``k`` units by ``method``'s score for ``source`` summed
    over the edit images (``captions`` carry activations; the gradient methods also need the
    ``images``), or ``k`` seeded random units."""
    if method == "random":
        return scoring.random_units(vlm.n_layers, vlm.d_ff, k, [seed, source_id])
    if method != "contribution" and len(images) != len(captions):
        raise EditInputError(f"units={method!r} needs the edit images to score them")
    targets = [NounToken(noun=str(source_id), step=s, token_id=source_id) for s in steps]
    weights = logit_weights(vlm, targets[:1])
    images = list(images) or [None] * len(captions)
    total = sum(unit_scores(vlm, image, caption, [target], (method,), weights)[method][0]
                for image, caption, target in zip(images, captions, targets))
    return scoring.top_units(total, k)[0]


def check_edit(vlm, images, source, target, units, config: EditConfig) -> None:
    """``EditInputError`` for an edit that cannot be learned as asked."""
    if not images:
        raise EditInputError("no images to edit: pass at least one image whose caption says the source")
    if source == target:
        raise EditInputError(f"source and target are the same word ({source!r}); pick a different target")
    if units is None and config.method not in UNIT_CHOICES:
        raise EditInputError(f"method must be one of {', '.join(UNIT_CHOICES)} (or pass units=), "
                             f"got {config.method!r}")
    if isinstance(units, str):
        raise EditInputError(f"units must be (layer, unit) pairs or table rows, got {units!r}; "
                             f"to choose them by a scoring method pass method={units!r}")
    if units is None and config.k > vlm.n_layers * vlm.d_ff:
        raise EditInputError(f"k must be ≤ {vlm.n_layers * vlm.d_ff}, got {config.k}")


def given_units(vlm, units) -> np.ndarray:
    """``Int[ndarray, "N 2"]``: the given units, each once, in their first order."""
    try:
        given = as_units(vlm, units)
    except ValueError as exc:
        raise EditInputError(str(exc)) from exc
    if len(given) == 0:
        raise EditInputError("units is empty: pass at least one (layer, unit) pair")
    return np.asarray(given[np.sort(np.unique(given, axis=0, return_index=True)[1])], dtype=np.int64)
