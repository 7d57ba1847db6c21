"""Targeted editing: make the model say ``target`` where it said ``source``.

The paper edits multi-modal neurons but its editing code was never published; this is
our design, each choice explained.

**What is edited.** Only the write vectors ``W_out[l][:, i]`` (``down_proj`` columns) of
the units it is given — typically a ``find_neurons`` table's top units for ``source``
(``units=units_of(table, source, k)``) — or, without them, the top-``k`` units for ``source``:
the units with the largest contribution score
(:func:`~mmneurons_utils.method.scoring.contribution_scores`) summed over the edit images at the
step that produced ``source``. These units already fire when the source is said and write
its unembedding direction, so moving their write vector towards ``target`` acts exactly
where the source is produced and little elsewhere (their activation is small on other
steps and images). One additive delta ``Δ[j]`` (``Float[Tensor, "D"]``) per unit. The
baselines pick their units the same way from their own scores (``method="gradient"``,
``"gradient_image"``) or at random (``method="random"``).

**How it is learned.** Adam on the deltas only (the model's parameters get no gradient),
through a forward hook that adds ``a[..., units] @ Δ`` to ``down_proj``'s output — the
same as ``W_out[:, units] += Δᵀ`` but without touching the weights while training. The
loss, per step, over one teacher-forced forward of prompt + *original* caption:

* ``−log p(target)`` at the source's step of each edit image (make the target win);
* ``kl_weight ·`` KL(original ‖ edited) at every other step of the edit images and at
  every step of the ``unrelated`` images' captions (keep everything else in place);
* ``norm_weight · ‖Δ‖² / ‖W_out[:, units]‖²`` (small, relative weight change).

Teacher forcing the original caption makes each loss term a fixed, well-defined
distribution (free-running captions would change length and alignment as the edit
progresses). Training **stops** as soon as the target beats every other token by
``stop_margin`` logits at the source step of every edit image (checked on the same
forward), or after ``steps`` steps: then the edit did not converge and is reported as
failed with its final margin, and the weights are left untouched unless ``keep_failed``.

**Result.** An :class:`Edit`: weight state only — ``apply()`` / ``undo()`` (bit-for-bit
restore of the cloned original columns), a context manager, ``save_pretrained()`` — and its
``report`` (:class:`EditReport`), the one place the edit's outcome lives (converged, steps,
margin, captions, metrics). ``edit.applied`` and ``report.applied`` read the weight state
live, so an ``undo()`` shows everywhere; ``report.accepted`` says whether the edit was put in
the weights and measured (converged, or ``keep_failed``).

**Metrics** come from one suite, :mod:`mmneurons_utils.properties.edit_metrics` (EasyEdit's
reliability / generality / locality, ``success`` / ``generalization`` / ``locality`` as aliases),
against a clean reference captioned once: :func:`evaluate_edit` here, or
:func:`~mmneurons_utils.batch.edit_evaluation.run_edit` for a pool.

**Evaluation rules.** Success and generalisation count only images whose clean caption says
the source and *not* the target (the others go to ``n_excluded_target``: losing the source
there is no flip). A failed edit is not applied (unless ``keep_failed``): success 0 (its images
keep saying the source), but locality, KL and generalisation NaN, as is generalisation with no
held-out image. :func:`~mmneurons_utils.batch.edit_evaluation.summarize_edits` takes success over every attempted pair, side effects
and ‖Δ‖ over the applied edits only.

**Learning is cached** by its settings (:data:`~.edit_learning.EDIT_CACHE`): the same request
on the same weights learns once per session.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..model.offload import write_columns
from ..model.vlm import EMBEDDED_MARKER
from ..properties import edit_metrics as M
from ..properties.edit_metrics import ALIASES, flip_share
from ..store.results import respect_umask
from .edit_inputs import check_edit, choose_units, given_units, source_steps, target_token
from .edit_learning import (EDIT_CACHE, UNIT_CHOICES, EditConfig, EditInputError, LearnedDeltas,
                            learn_deltas)

__all__ = ["EDIT_CACHE", "Edit", "EditConfig", "EditInputError", "EditReport", "UNIT_CHOICES",
           "accept", "choose_units", "edit_token", "evaluate_edit", "flip_share", "target_token"]


class WeightState:
    """Whether an edit's deltas are in the weights now: one object, shared by the :class:`Edit`
    that writes them and its :class:`EditReport`, so both read the same live state."""

    __slots__ = ("applied",)

    def __init__(self):
        self.applied = False

    def __repr__(self) -> str:
        return f"WeightState(applied={self.applied})"


# the report's order of the measured numbers (as_dict), the package's earlier names first
_ORDER = ("converged", "final_margin", "steps", "n_neurons", "unit_choice", "weight_norm",
          "relative_norm", "applied", "accepted", "success", "n_excluded_target", "generalization",
          "n_heldout", "n_heldout_excluded", "locality", "locality_kl", "n_locality", "n_edit")


@dataclass
class EditReport:
    """An edit's outcome — the only place it lives — and the rule for an edit not applied.

    Always: ``converged``, ``final_margin``, ``steps``, ``n_neurons``, ``unit_choice``
    (``"given"`` or the method that chose the units), ``weight_norm`` (‖Δ‖_F),
    ``relative_norm`` (‖Δ‖_F / ‖W_out[:, units]‖_F), ``accepted`` (put in the weights and
    measured: converged, or ``keep_failed``), ``reliability_free`` (alias ``success``: share of
    the edit images whose new caption says the target and not the source, over those whose clean
    caption did not already say the target; NaN if none), ``n_excluded_target`` (the images left
    out of it) and the edit images' ``captions_before`` / ``captions_after``. Once measured
    (``None`` before; :func:`~mmneurons_utils.properties.edit_metrics.edit_metrics`): every
    metric of that module (``m_generality_free`` alias ``generalization``, ``m_locality_free``
    alias ``locality``, ``locality_kl``, …), ``n_heldout``, ``n_heldout_excluded``,
    ``n_locality`` and ``n_edit``.

    ``applied`` is not stored: it reads the edit's weight state now (``False`` after ``undo()``).
    """

    converged: bool
    final_margin: float
    steps: int
    n_neurons: int
    unit_choice: str
    weight_norm: float
    relative_norm: float
    accepted: bool = False
    reliability_free: float = math.nan
    n_excluded_target: int = 0
    captions_before: list = field(default_factory=list)
    captions_after: list = field(default_factory=list)
    reliability: float | None = None
    m_generality: float | None = None
    m_generality_free: float | None = None
    n_heldout: int | None = None
    n_heldout_excluded: int | None = None
    m_locality: float | None = None
    m_locality_free: float | None = None
    locality_kl: float | None = None
    n_locality: int | None = None
    n_edit: int | None = None
    t_generality: float | None = None
    t_generality_free: float | None = None
    n_t_generality: int | None = None
    t_locality: float | None = None
    t_locality_free: float | None = None
    no_image_locality: float | None = None
    text_transfer: float | None = None
    decoupling: float | None = None
    text_logit_gain: float | None = None
    state: WeightState = field(default_factory=WeightState, repr=False, compare=False)

    @property
    def applied(self) -> bool:
        """Whether the edit's deltas are in the weights now (live: ``undo()`` makes it False)."""
        return self.state.applied

    # the package's earlier names of the free-running metrics
    success = property(lambda self: self.reliability_free)
    generalization = property(lambda self: self.m_generality_free)
    locality = property(lambda self: self.m_locality_free)

    def not_applied(self, n_heldout: int, n_locality: int) -> None:
        """The rule for a failed, unapplied edit: nothing was put in the weights, so no side
        effect was measured — generalisation, locality and KL are NaN (not the unchanged
        model's "nothing drifted"); its success was scored on the clean captions (0: nothing
        flips)."""
        nan = math.nan
        self.update(reliability=0.0, m_generality=nan, m_generality_free=nan, n_heldout=n_heldout,
                    n_heldout_excluded=0, m_locality=nan, m_locality_free=nan, locality_kl=nan,
                    n_locality=n_locality)

    def update(self, **values) -> None:
        """Set measured numbers by name (the aliases ``success`` / ``generalization`` /
        ``locality`` set their EasyEdit-style field); ``KeyError`` for an unknown name."""
        names = {f.name for f in fields(self)} - {"state"}
        values = {ALIASES.get(k, k): v for k, v in values.items()}
        unknown = sorted(set(values) - names)
        if unknown:
            raise KeyError(f"EditReport has no field(s) {', '.join(unknown)}")
        for name, value in values.items():
            setattr(self, name, value)

    def as_dict(self) -> dict:
        """The measured numbers (those still ``None`` left out; no captions): the package's
        names in their earlier order, ``applied`` read now, then the EasyEdit-style ones."""
        out = {}
        for name in _ORDER:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for f in fields(self):
            if f.name not in out and f.name not in ("state", "captions_before", "captions_after"):
                value = getattr(self, f.name)
                if value is not None:
                    out[f.name] = value
        return out


@dataclass
class Edit:
    """A learned edit: additive deltas ``Float[Tensor, "N D"]`` on the write vectors of ``units``.

    Weight state only: :meth:`apply`, :meth:`undo`, the context manager and
    :meth:`save_pretrained`; ``applied`` says whether the deltas are in the weights now.
    The outcome is its ``report`` (:class:`EditReport`); ``converged``, ``final_margin``,
    ``steps``, ``captions_before`` / ``captions_after`` and ``metrics`` (the report as a dict) are
    read from it.
    """

    vlm: object = field(repr=False)
    source: str
    target: str
    target_id: int
    units: np.ndarray
    deltas: torch.Tensor
    report: EditReport
    images: list = field(default_factory=list, repr=False)        # the edit images
    clean_ids: list = field(default_factory=list, repr=False)     # their clean caption token ids
    history: list[dict] = field(default_factory=list, repr=False)
    _originals: list[torch.Tensor] = field(default_factory=list, repr=False)

    @classmethod
    def learned(cls, vlm, source: str, target: str, target_id: int, learned: LearnedDeltas,
                captions: Sequence, unit_choice: str, images: Sequence = ()) -> "Edit":
        """An unapplied edit of what :func:`~.edit_learning.learn_deltas` learned; ``captions``:
        the edit images' clean captions."""
        report = EditReport(converged=learned.converged, final_margin=learned.final_margin,
                            steps=learned.steps, n_neurons=len(learned.units), unit_choice=unit_choice,
                            weight_norm=learned.weight_norm, relative_norm=learned.relative_norm,
                            captions_before=[c.text for c in captions])
        return cls(vlm=vlm, source=source, target=target, target_id=target_id, units=learned.units,
                   deltas=learned.deltas, report=report, images=list(images),
                   clean_ids=[list(c.token_ids) for c in captions], history=learned.history,
                   _originals=learned.originals)

    # --- the outcome, read from the report ------------------------------------------
    @property
    def applied(self) -> bool:
        return self.report.state.applied

    @property
    def converged(self) -> bool:
        return self.report.converged

    @property
    def final_margin(self) -> float:
        return self.report.final_margin

    @property
    def steps(self) -> int:
        return self.report.steps

    @property
    def captions_before(self) -> list[str]:
        return self.report.captions_before

    @property
    def captions_after(self) -> list[str]:
        return self.report.captions_after

    @property
    def metrics(self) -> dict:
        return self.report.as_dict()

    # --- weights ---------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> "Edit":
        """Write ``original + Δ`` into the columns (always computed from the clones, so
        applying twice gives the same weights)."""
        if not self.applied:
            self._write([(o.float() + d.to(o.device)).to(o.dtype)
                         for o, d in zip(self._originals, self.deltas)])
            self.report.state.applied = True
        return self

    def _write(self, columns: list[torch.Tensor]) -> None:
        """Put ``columns`` (one ``Float[Tensor, "D"]`` per unit) into the weights, one write per layer."""
        for layer in sorted({int(l) for l in self.units[:, 0]}):
            rows = [j for j, l in enumerate(self.units[:, 0]) if int(l) == layer]
            write_columns(self.vlm.down_proj(layer), torch.as_tensor(self.units[rows, 1]),
                          torch.stack([columns[j] for j in rows], 1))

    @torch.no_grad()
    def undo(self) -> "Edit":
        """Copy the cloned original columns back (bit-for-bit); safe to call twice."""
        if self.applied:
            self._write(self._originals)
            self.report.state.applied = False
        return self

    def __enter__(self) -> "Edit":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.undo()

    # --- saving ----------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> Path:
        """Save the edited model (weights, processor, ``edit.json``) to the new folder ``path``.

        Written to a temporary folder beside ``path`` and renamed at the end, so a failure
        never leaves a half-written folder. ``load_vlm(path)`` loads it back.
        """

        path = Path(path).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise EditInputError(f"{path} already exists and is not an empty folder; choose a new one")
        if not self.applied:
            raise EditInputError("the edit is not applied (undone or failed); call edit.apply() first")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.vlm.model.save_pretrained(tmp)
            self.vlm.processor.save_pretrained(tmp)
            if self.vlm.noun_vocabulary is not None:  # keep the noun vocabulary on reload
                (tmp / EMBEDDED_MARKER).write_text(json.dumps(
                    {"nouns": list(self.vlm.noun_vocabulary), "source": "mmneurons_utils.interventions.editing"}))
            (tmp / "edit.json").write_text(json.dumps(self.summary(), indent=1))
            respect_umask(tmp)      # mkdtemp's folder is 0700: readable by others as mkdir makes it
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def summary(self) -> dict:
        """JSON-friendly description: source, target, units and the report (NaN → ``None``;
        ``applied`` as it is now)."""
        metrics = {k: None if isinstance(v, float) and v != v else v for k, v in self.metrics.items()}
        metrics = {**metrics, **{alias: metrics[name] for alias, name in ALIASES.items() if name in metrics}}
        return dict(model=self.vlm.name, source=self.source, target=self.target,
                    units=[[int(l), int(u)] for l, u in self.units], **metrics)




def accept(edit: Edit, images: Sequence, keep_failed: bool, max_new_tokens: int = 20) -> Edit:
    """Put the edit in the weights if it converged (or ``keep_failed``) and score its
    ``reliability_free`` (``success``) on ``images`` (the edit images): an edit not accepted
    leaves the model unchanged, so its captions are the clean ones (success 0 on the scorable
    images)."""
    report = edit.report
    if edit.converged or keep_failed:
        edit.apply()
        after = [c.text for c in edit.vlm.describe(images, max_new_tokens=max_new_tokens)]
    else:
        after = list(report.captions_before)
    success, excluded = flip_share(report.captions_before, after, edit.source, edit.target)
    report.update(accepted=edit.applied, captions_after=after, reliability_free=success,
                  n_excluded_target=excluded)
    return edit


def measure(edit: Edit, reference: "M.CleanReference") -> dict:
    """The edit's metrics against ``reference`` (:func:`~mmneurons_utils.properties.edit_metrics.edit_metrics`),
    put in its report; the weights are left as they were found."""
    metrics = M.edit_metrics(edit.vlm, reference, edit)
    edit.report.update(**{k: v for k, v in metrics.items() if k not in ALIASES})
    return metrics


def evaluate_edit(edit: Edit, heldout_images: Sequence = (), locality_images: Sequence = (),
                  max_new_tokens: int = 20, extended: bool = False) -> dict:
    """Side effects on images not used for learning the edit, into its report; returns the
    metrics (with the aliases ``success``, ``generalization``, ``locality``).

    The clean reference is made here (the edit taken out for it and the weights left as they
    were found); ``heldout_images``: ``generalization`` (``m_generality_free``) = share whose
    edited caption says the target and not the source, over the ``n_heldout`` images whose clean
    caption says the source and not the target (``n_heldout_excluded`` others are not scored);
    ``locality_images`` (clean captions without the source): ``locality`` (``m_locality_free``)
    = share whose caption is unchanged, ``locality_kl`` = mean KL(clean ‖ edited) over caption
    steps (nats), ``m_locality`` = teacher-forced token agreement. An edit that was not accepted
    gets the rule's NaN side effects. ``extended``: also the text-side metrics.
    """
    was_applied = edit.applied
    edit.undo()
    try:
        ref = M.clean_reference(edit.vlm, edit.source, edit.target, edit.target_id, edit.images,
                                heldout_images, locality_images, max_new_tokens=max_new_tokens,
                                edit_captions=edit.clean_ids, extended=extended)
    finally:
        if was_applied:
            edit.apply()
    return measure(edit, ref)


def edit_token(vlm, images: Sequence, source: str, target: str, units=None, unrelated: Sequence = (),
               config: EditConfig | None = None, captions: Sequence | None = None,
               progress: bool = False, unrelated_captions: Sequence | None = None,
               **settings) -> Edit:
    """Learn deltas on the write vectors of ``units`` so that ``images`` say ``target``
    where they said ``source`` (see the module docstring for the design).

    ``images``: PIL images whose generated captions say ``source``. ``units``: the units to
    edit — ``Int[ndarray, "N 2"]`` of ``(layer, unit)``, or rows of a ``find_neurons`` table
    (e.g. ``ident.units(source, k)``: the neurons found are the ones edited). Without
    ``units`` the top-``k`` units are chosen here by ``method``'s score for the source summed
    over ``images``: ``"contribution"`` (the paper's neurons), ``"gradient"`` /
    ``"gradient_image"`` (either gradient baseline) or ``"random"`` (``seed``-ed). ``unrelated``:
    images whose captions the edit must leave alone (their KL enters the loss).
    ``config`` / ``settings``: an :class:`EditConfig` and any of its fields by name
    (``k=5, steps=150, …``). ``captions`` / ``unrelated_captions``: the images' captions if
    already made (``captions`` with activations when the units are to be chosen here, e.g. an
    ``Identification``'s); otherwise they are made here.

    Returns an applied :class:`Edit` if it converged (or ``keep_failed``); a failed edit
    comes back with ``applied=False``, ``converged=False`` and its ``final_margin``.
    ``success`` skips the images whose clean caption already says ``target``
    (``n_excluded_target``); a failed, unapplied edit scores 0 on the others (nothing flips).
    The same request on the same weights is learned once (:data:`EDIT_CACHE`).
    """
    config = EditConfig.of(config, **settings)
    images, unrelated = list(images), list(unrelated)
    check_edit(vlm, images, source, target, units, config)
    target_id = target_token(vlm, target)
    if captions is None:      # activations only when the units are chosen from them
        captions = vlm.describe(images, max_new_tokens=config.max_new_tokens,
                                activation="down_proj_input" if units is None else None)
    captions = list(captions)
    src_steps = source_steps(vlm, captions, source)
    source_id = captions[0].token_ids[src_steps[0]]
    if units is None:
        chosen = choose_units(vlm, captions, src_steps, source_id, config.k, config.method,
                              config.seed, images)
    else:
        chosen = given_units(vlm, units)
    if unrelated_captions is None:
        unrelated_captions = vlm.describe(unrelated, max_new_tokens=config.max_new_tokens) if unrelated else []
    learned = learn_deltas(vlm, images, captions, src_steps, target_id, chosen, unrelated,
                           list(unrelated_captions), config, progress, label=f"edit {source}→{target}")
    edit = Edit.learned(vlm, source, target, target_id, learned, captions,
                        unit_choice=config.method if units is None else "given", images=images)
    return accept(edit, images, config.keep_failed, config.max_new_tokens)
