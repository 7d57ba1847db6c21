"""Batch evaluation of edits: a pool of captioned images, source → target pairs, the
edit table and its summary (the editing method itself is :mod:`mmneurons_utils.interventions.editing`,
the metrics :mod:`mmneurons_utils.properties.edit_metrics`).

:func:`request` splits a :class:`ImagePool` for one source → target pair and measures the clean
reference once (the held-out and locality images captioned clean once); :func:`run_edit` edits on
the part that says the source and measures generalisation and locality on parts it never saw;
:func:`edit_table` does that for many pairs and unit choices, one request per pair shared by its
unit choices, undoing each edit before the next; :func:`summarize_edits` averages success over
every attempted pair and side effects over the applied edits only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..interventions.editing import Edit, EditInputError, edit_token, measure
from ..interventions.edit_inputs import target_token
from ..model.nouns import says
from ..properties.edit_metrics import ALIASES, CleanReference, clean_reference


@dataclass
class ImagePool:
    """Images with the model's captions, indexed by the nouns the captions say.

    ``vocabulary``: the nouns :func:`default_pairs` may pick as targets (the model's noun
    vocabulary, else the nouns said in the pool).
    """

    images: list
    captions: list
    vocabulary: list = field(default_factory=list)

    @classmethod
    def build(cls, vlm, images: Sequence, max_new_tokens: int = 20, progress: bool = False,
              known: Sequence = ()) -> "ImagePool":
        """Caption ``images`` (PIL) with ``vlm``; ``known``: captions already made for the first
        ``len(known)`` of them (e.g. an ``Identification``'s), not made again."""
        images, known = list(images), list(known)[:len(images)]
        rest = images[len(known):]
        captions = known + (vlm.describe(rest, max_new_tokens=max_new_tokens, progress=progress)
                            if rest else [])
        vocabulary = sorted(vlm.noun_vocabulary or {n for c in captions for n in c.nouns})
        return cls(images, captions, vocabulary)

    def with_noun(self, noun: str) -> list[int]:
        return [i for i, c in enumerate(self.captions) if says(c.text, noun)]

    def without_noun(self, noun: str) -> list[int]:
        return [i for i, c in enumerate(self.captions) if not says(c.text, noun)]

    def nouns(self) -> list[str]:
        return sorted({n for c in self.captions for n in c.nouns})

    def split(self, source: str, n_edit: int | None = None, n_unrelated: int = 8,
              n_locality: int | None = None, target: str | None = None) -> dict:
        """Image indices for an edit of ``source`` into ``target``: ``edit`` (half of those
        saying the source and not the target, or ``n_edit``), ``heldout`` (the rest of
        them), ``excluded_target`` (those saying both: they cannot show a flip, so they are
        neither edited nor held out), ``unrelated`` (first ``n_unrelated`` without the
        source, used in the loss) and ``locality`` (the next ones, never seen)."""
        said = self.with_noun(source)
        if not said:
            raise EditInputError(f"source {source!r} is in none of the {len(self.captions)} captions; "
                                 f"nouns said: {', '.join(self.nouns())}")
        also = set(self.with_noun(target)) if target is not None else set()
        excluded = [i for i in said if i in also]
        said = [i for i in said if i not in also]
        if not said:
            raise EditInputError(f"every caption saying {source!r} already says {target!r}; "
                                 f"choose another target or a larger pool")
        n_edit = max(1, (len(said) + 1) // 2) if n_edit is None else min(n_edit, len(said))
        without = self.without_noun(source)
        stop = None if n_locality is None else n_unrelated + n_locality
        return dict(edit=said[:n_edit], heldout=said[n_edit:], excluded_target=excluded,
                    unrelated=without[:n_unrelated], locality=without[n_unrelated:stop])


@dataclass
class EditRequest:
    """One source → target pair on a pool's split, made once and shared by every editor of the
    pair: ``parts`` (:meth:`ImagePool.split`'s indices), the edit images' captions with
    ``down_proj_input`` activations, the unrelated images' captions and the clean ``reference``
    (:func:`~mmneurons_utils.properties.edit_metrics.clean_reference`)."""

    source: str
    target: str
    parts: dict
    images: list
    unrelated: list
    captions: list
    unrelated_captions: list
    reference: CleanReference


def request(vlm, pool: ImagePool, source: str, target: str, n_edit: int | None = None,
            n_unrelated: int = 8, n_locality: int | None = None, n_heldout: int | None = None,
            extended: bool = False, max_new_tokens: int = 20) -> EditRequest:
    """The :class:`EditRequest` of one pair: split, captions and the clean reference, each made
    once (``n_heldout``: at most that many held-out images; ``extended``: the reference's text
    probes too, for the editor comparison)."""
    target_id = target_token(vlm, target)
    parts = pool.split(source, n_edit, n_unrelated, n_locality, target=target)
    pick = lambda key: [pool.images[i] for i in parts[key]]
    images, unrelated = pick("edit"), pick("unrelated")
    heldout = pick("heldout")[:n_heldout] if n_heldout is not None else pick("heldout")
    captions = vlm.describe(images, max_new_tokens=max_new_tokens, activation="down_proj_input")
    others = vlm.describe(unrelated, max_new_tokens=max_new_tokens) if unrelated else []
    ref = clean_reference(vlm, source, target, target_id, images, heldout, pick("locality"),
                          max_new_tokens=max_new_tokens, edit_captions=captions, extended=extended)
    return EditRequest(source, target, parts, images, unrelated, captions, others, ref)


def finish(edit: Edit, req: EditRequest, keep: bool = False) -> Edit:
    """Measure ``edit`` against the request's reference into its report (its ``n_edit`` and the
    pool's excluded images added to ``n_excluded_target``); undone unless ``keep``."""
    try:
        measure(edit, req.reference)
        edit.report.update(n_edit=len(req.parts["edit"]),
                           n_excluded_target=edit.report.n_excluded_target + len(req.parts["excluded_target"]))
    finally:
        if not keep:
            edit.undo()
    return edit


def run_edit(vlm, pool: ImagePool, source: str, target: str, k: int = 5,
             method: str = "contribution", units=None, n_edit: int | None = None,
             n_unrelated: int = 8, n_locality: int | None = None, seed: int = 0,
             keep: bool = False, req: EditRequest | None = None, **kwargs) -> Edit:
    """Edit on a pool's split and evaluate on its held-out parts; undone unless ``keep``.

    ``units`` / ``method`` / ``k`` as in :func:`~mmneurons_utils.interventions.editing.edit_token`. Images
    saying both the source and the target are left out (``n_excluded_target``). A failed,
    unapplied edit gets NaN side effects (:meth:`~mmneurons_utils.interventions.editing.EditReport.not_applied`).
    ``req``: the pair's :class:`EditRequest` if already made (:func:`request`).
    """
    if req is None:
        req = request(vlm, pool, source, target, n_edit, n_unrelated, n_locality,
                      max_new_tokens=kwargs.get("max_new_tokens", 20))
    edit = edit_token(vlm, req.images, source, target, units=units, method=method, k=k,
                      unrelated=req.unrelated, seed=seed, captions=req.captions,
                      unrelated_captions=req.unrelated_captions, **kwargs)
    return finish(edit, req, keep)


TABLE_METRICS = ("reliability", "reliability_free", "m_generality", "m_generality_free",
                 "m_locality", "m_locality_free")
"""The EasyEdit-style columns of :func:`edit_table`, after the package's own
(``success`` = ``reliability_free``, ``generalization`` = ``m_generality_free``,
``locality`` = ``m_locality_free``)."""


def edit_row(edit: Edit) -> dict:
    """The table columns of one measured edit (``applied``: it was put in the weights and
    measured, i.e. its report's ``accepted``)."""
    m = edit.report
    nan = np.nan

    def get(name, default=nan):
        value = getattr(m, name)
        return default if value is None else value

    return dict(applied=bool(m.accepted), success=m.reliability_free,
                generalization=get("m_generality_free"), locality=get("m_locality_free"),
                locality_kl=get("locality_kl"), converged=m.converged, final_margin=m.final_margin,
                steps=m.steps, weight_norm=m.weight_norm, relative_norm=m.relative_norm,
                n_edit=m.n_edit, n_heldout=get("n_heldout", 0), n_locality=get("n_locality", 0),
                n_excluded_target=m.n_excluded_target, **{k: get(k) for k in TABLE_METRICS})


def edit_table(vlm, pool: ImagePool, pairs: Sequence[tuple[str, str]],
               configs: Sequence[tuple[str, int]] = (("contribution", 5), ("random", 5)),
               seed: int = 0, progress: bool = False, n_edit: int | None = None,
               n_unrelated: int = 8, n_locality: int | None = None, n_heldout: int | None = None,
               **kwargs) -> pd.DataFrame:
    """Tidy table, one row per (source, target, units, n_neurons): every edit's metrics.

    ``configs``: ``(method, k)`` settings to compare (e.g. the paper's neurons vs the same
    number of random units, and more or fewer neurons); the table names them in its
    ``units`` and ``n_neurons`` columns. Each pair's split, captions and clean reference are
    made once (:func:`request`; ``n_heldout``: at most that many held-out images, default all);
    each edit is undone before the next one.
    ``applied``: the edit was put in the weights and measured; the side-effect columns of
    the others are NaN (see :mod:`mmneurons_utils.interventions.editing`). Columns: the
    package's (``success``, ``generalization``, ``locality``, ``locality_kl``, …) and the
    EasyEdit-style :data:`TABLE_METRICS`.
    """
    from tqdm.auto import tqdm

    rows = []
    jobs = [(s, t, m, k) for s, t in pairs for m, k in configs]
    req = None
    for source, target, method, k in tqdm(jobs, desc="edits", disable=not progress):
        if req is None or (req.source, req.target) != (source, target):
            req = request(vlm, pool, source, target, n_edit, n_unrelated, n_locality, n_heldout,
                          max_new_tokens=kwargs.get("max_new_tokens", 20))
        edit = run_edit(vlm, pool, source, target, k=k, method=method, seed=seed, req=req, **kwargs)
        rows.append(dict(source=source, target=target, units=method, n_neurons=k, **edit_row(edit)))
    return pd.DataFrame(rows)


def default_pairs(pool: ImagePool, n_pairs: int = 20, min_images: int = 4, seed: int = 0
                  ) -> list[tuple[str, str]]:
    """``n_pairs`` seeded ``(source, target)`` pairs: distinct sources said in at least
    ``min_images`` of the pool's captions, each with a different random target noun, among
    the targets that leave at least ``min_images`` captions saying the source and not the
    target (the only images an edit can be scored on)."""
    rng = np.random.default_rng(seed)
    sources = [n for n in pool.nouns() if len(pool.with_noun(n)) >= min_images]
    if len(sources) < n_pairs:
        raise EditInputError(f"only {len(sources)} nouns are said in ≥ {min_images} captions of the "
                             f"pool; ask for fewer pairs or a larger pool")
    vocabulary = list(pool.vocabulary) or pool.nouns()
    said = {noun: set(pool.with_noun(noun)) for noun in vocabulary}
    pairs = []
    for i in rng.permutation(len(sources)):
        source = sources[i]
        choices = [t for t in vocabulary if t != source and len(said[source] - said[t]) >= min_images]
        if choices:
            pairs.append((source, choices[int(rng.integers(len(choices)))]))
        if len(pairs) == n_pairs:
            return pairs
    raise EditInputError(f"only {len(pairs)} nouns are said in ≥ {min_images} captions without "
                         f"some target; ask for fewer pairs or a larger pool")


APPLIED_ONLY = ("generalization", "locality", "locality_kl", "weight_norm", "relative_norm")


def summarize_edits(table: pd.DataFrame) -> pd.DataFrame:
    """One row per ``units, n_neurons``: ``n_pairs`` attempted, ``n_applied``; ``success``,
    ``converged`` and ``steps`` averaged over every attempted pair (a failed edit scores
    success 0: its images still say the source); generalisation (over pairs with held-out
    images), locality, KL and ‖Δ‖ averaged over the applied edits only, NaN when none was
    applied; ``n_excluded_target`` summed (images already saying the target, not scored).

    A table without an ``applied`` column counts its converged edits as applied.
    """
    keys = ["units", "n_neurons"]
    table = table.assign(applied=(table["applied"] if "applied" in table else table["converged"]).astype(bool))
    every = table.groupby(keys, sort=True)
    out = pd.DataFrame({"n_pairs": every.size(), "n_applied": every["applied"].sum().astype(int)})
    out = out.join(every[["success", "converged", "steps"]].mean())
    side = table[table["applied"]].groupby(keys, sort=True)[list(APPLIED_ONLY)].mean()
    out = out.join(side.reindex(out.index))       # groups with no applied edit: NaN
    if "n_excluded_target" in table:
        out["n_excluded_target"] = every["n_excluded_target"].sum()
    order = ["n_pairs", "n_applied", "success", "generalization", "locality", "locality_kl",
             "converged", "steps", "weight_norm", "relative_norm", "n_excluded_target"]
    return out[[c for c in order if c in out]].reset_index()
