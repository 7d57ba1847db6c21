"""Batch evaluation of edits: a pool of captioned images, source → target pairs, the
edit table and its summary (the editing method itself is :mod:`mmneurons_utils.interventions.editing`).

:func:`run_edit` edits on one part of a :class:`ImagePool` that says the source and
measures generalisation and locality on parts it never saw; :func:`edit_table` does that
for many pairs and unit choices, undoing each edit before the next; :func:`summarize_edits`
averages success over every attempted pair and side effects over the applied edits only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd

from ..interventions.editing import Edit, EditInputError, edit_token
from ..model.nouns import says


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
    def build(cls, vlm, images: Sequence, max_new_tokens: int = 20, progress: bool = False) -> "ImagePool":
        """Caption ``images`` (PIL) with ``vlm``."""
        images = list(images)
        captions = vlm.describe(images, max_new_tokens=max_new_tokens, progress=progress)
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


def run_edit(vlm, pool: ImagePool, source: str, target: str, k: int = 5,
             method: str = "contribution", units=None, n_edit: int | None = None,
             n_unrelated: int = 8, n_locality: int | None = None, seed: int = 0,
             keep: bool = False, **kwargs) -> Edit:
    """Edit on a pool's split and evaluate on its held-out parts; undone unless ``keep``.

    ``units`` / ``method`` / ``k`` as in :func:`~mmneurons_utils.interventions.editing.edit_token`. Images
    saying both the source and the target are left out (``n_excluded_target``). A failed,
    unapplied edit gets NaN side effects (:meth:`~mmneurons_utils.interventions.editing.EditReport.not_applied`).
    """
    parts = pool.split(source, n_edit, n_unrelated, n_locality, target=target)
    pick = lambda key: [pool.images[i] for i in parts[key]]
    edit = edit_token(vlm, pick("edit"), source, target, units=units, method=method, k=k,
                      unrelated=pick("unrelated"), seed=seed, **kwargs)
    edit.measure_side_effects(pick("heldout"), pick("locality"))
    edit.report.update(n_edit=len(parts["edit"]),
                       n_excluded_target=edit.report.n_excluded_target + len(parts["excluded_target"]))
    if not keep:
        edit.undo()
    return edit


def edit_table(vlm, pool: ImagePool, pairs: Sequence[tuple[str, str]],
               configs: Sequence[tuple[str, int]] = (("contribution", 5), ("random", 5)),
               seed: int = 0, progress: bool = False, **kwargs) -> pd.DataFrame:
    """Tidy table, one row per (source, target, units, n_neurons): every edit's metrics.

    ``configs``: ``(method, k)`` settings to compare (e.g. the paper's neurons vs the same
    number of random units, and more or fewer neurons); the table names them in its
    ``units`` and ``n_neurons`` columns. Each edit is undone before the next one.
    ``applied``: the edit was put in the weights and measured; the side-effect columns of
    the others are NaN (see :mod:`mmneurons_utils.interventions.editing`).
    """
    from tqdm.auto import tqdm

    rows = []
    jobs = [(s, t, m, k) for s, t in pairs for m, k in configs]
    for source, target, method, k in tqdm(jobs, desc="edits", disable=not progress):
        edit = run_edit(vlm, pool, source, target, k=k, method=method, seed=seed, **kwargs)
        m = edit.metrics
        rows.append(dict(source=source, target=target, units=method, n_neurons=k,
                         applied=bool(m["applied"]),
                         success=m["success"], generalization=m.get("generalization", np.nan),
                         locality=m.get("locality", np.nan), locality_kl=m.get("locality_kl", np.nan),
                         converged=m["converged"], final_margin=m["final_margin"], steps=m["steps"],
                         weight_norm=m["weight_norm"], relative_norm=m["relative_norm"],
                         n_edit=m["n_edit"], n_heldout=m.get("n_heldout", 0),
                         n_locality=m.get("n_locality", 0), n_excluded_target=m["n_excluded_target"]))
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
