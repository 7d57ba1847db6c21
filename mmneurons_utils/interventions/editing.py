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

**Result.** An :class:`Edit` with the metrics, ``undo()`` (bit-for-bit restore of the
cloned original columns), ``apply()`` (re-apply the same edit), ``evaluate()``
(generalisation and locality on held-out images) and ``save_pretrained()``.

**Evaluation rules.** Success and generalisation count only images whose clean caption says
the source and *not* the target (the others go to ``n_excluded_target``: losing the source
there is no flip). A failed edit is not applied (unless ``keep_failed``): success 0 (its images
keep saying the source), but locality, KL and generalisation NaN, as is generalisation with no
held-out image. :func:`~mmneurons_utils.batch.edit_evaluation.summarize_edits` takes success over every attempted pair, side effects
and ‖Δ‖ over the applied edits only.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..model.nouns import says
from ..model.offload import write_columns
from ..model.teacher_forcing import teacher_forced_logits
from ..model.vlm import EMBEDDED_MARKER
from .edit_inputs import check_edit, choose_units, given_units, source_steps, target_token
from .edit_learning import UNIT_CHOICES, EditConfig, EditInputError, LearnedDeltas, learn_deltas

__all__ = ["Edit", "EditConfig", "EditInputError", "EditReport", "UNIT_CHOICES", "choose_units",
           "edit_token", "flip_share", "target_token"]


@dataclass
class EditReport:
    """An edit's numbers, and the rule for an edit that was not applied.

    Always: ``converged``, ``final_margin``, ``steps``, ``n_neurons``, ``unit_choice``
    (``"given"`` or the method that chose the units), ``weight_norm`` (‖Δ‖_F),
    ``relative_norm`` (‖Δ‖_F / ‖W_out[:, units]‖_F), ``applied`` (put in the weights and
    measured: converged, or ``keep_failed``), ``success`` (share of the edit images whose new
    caption says the target and not the source, over those whose clean caption did not already
    say the target; NaN if none) and ``n_excluded_target`` (the images left out of it). Once
    measured (``None`` before): ``generalization``, ``n_heldout``, ``n_heldout_excluded``,
    ``locality``, ``locality_kl``, ``n_locality`` (:meth:`Edit.evaluate`) and ``n_edit``.
    """

    converged: bool
    final_margin: float
    steps: int
    n_neurons: int
    unit_choice: str
    weight_norm: float
    relative_norm: float
    applied: bool = False
    success: float = math.nan
    n_excluded_target: int = 0
    generalization: float | None = None
    n_heldout: int | None = None
    n_heldout_excluded: int | None = None
    locality: float | None = None
    locality_kl: float | None = None
    n_locality: int | None = None
    n_edit: int | None = None

    def not_applied(self, n_heldout: int, n_locality: int) -> None:
        """The rule for a failed, unapplied edit: nothing was put in the weights, so no side
        effect was measured — generalisation, locality and KL are NaN (not the unchanged
        model's "nothing drifted"); its success was scored on the clean captions (0: nothing
        flips)."""
        nan = math.nan
        self.update(generalization=nan, n_heldout=n_heldout, n_heldout_excluded=0,
                    locality=nan, locality_kl=nan, n_locality=n_locality)

    def update(self, **values) -> None:
        names = {f.name for f in fields(self)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise KeyError(f"EditReport has no field(s) {', '.join(unknown)}")
        for name, value in values.items():
            setattr(self, name, value)

    def as_dict(self) -> dict:
        """The measured numbers, in field order (those still ``None`` left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Edit:
    """A learned edit: additive deltas ``Float[Tensor, "N D"]`` on the write vectors of ``units``.

    ``applied`` says whether the deltas are in the weights now; ``report`` holds the numbers
    (:class:`EditReport`), ``metrics`` the same as a dict.
    """

    vlm: object = field(repr=False)
    source: str
    target: str
    target_id: int
    units: np.ndarray
    deltas: torch.Tensor
    converged: bool
    final_margin: float
    steps: int
    captions_before: list[str]
    report: EditReport
    captions_after: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list, repr=False)
    applied: bool = False
    _originals: list[torch.Tensor] = field(default_factory=list, repr=False)

    @classmethod
    def learned(cls, vlm, source: str, target: str, target_id: int, learned: LearnedDeltas,
                captions_before: list[str], unit_choice: str) -> "Edit":
        """An unapplied edit of what :func:`~.edit_learning.learn_deltas` learned."""
        report = EditReport(converged=learned.converged, final_margin=learned.final_margin,
                            steps=learned.steps, n_neurons=len(learned.units), unit_choice=unit_choice,
                            weight_norm=learned.weight_norm, relative_norm=learned.relative_norm)
        return cls(vlm=vlm, source=source, target=target, target_id=target_id, units=learned.units,
                   deltas=learned.deltas, converged=learned.converged,
                   final_margin=learned.final_margin, steps=learned.steps,
                   captions_before=captions_before, report=report, history=learned.history,
                   _originals=learned.originals)

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
            self.applied = True
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
            self.applied = False
        return self

    def __enter__(self) -> "Edit":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.undo()

    # --- evaluation ------------------------------------------------------------
    def evaluate(self, heldout_images: Sequence = (), locality_images: Sequence = (),
                 max_new_tokens: int = 20) -> dict:
        """Side effects on images not used for learning the edit; adds to ``metrics``.

        Measures the edit *as if applied* (it is applied for the measurement and left as
        it was found), so a failed edit can be studied too; :func:`~mmneurons_utils.batch.edit_evaluation.run_edit` gives a failed,
        unapplied edit NaN side effects instead (nothing was put in the weights).

        ``heldout_images``: ``generalization`` = share whose edited caption says the target
        and not the source, over the ``n_heldout`` images whose clean caption says the source
        and not the target (``n_heldout_excluded`` others are not scored); NaN when none.
        ``locality_images`` (clean captions without the source): ``locality`` = share whose
        caption is unchanged; ``locality_kl`` = mean over caption steps of KL(clean ‖ edited),
        teacher-forcing the clean caption (nats); both NaN without locality images.
        """
        was_applied = self.applied
        vlm = self.vlm
        heldout_images = list(heldout_images)
        self.undo()
        held = vlm.describe(heldout_images, max_new_tokens=max_new_tokens) if heldout_images else []
        local = vlm.describe(list(locality_images), max_new_tokens=max_new_tokens) if len(locality_images) else []
        local_ids = [c.token_ids for c in local]
        clean_logits = teacher_forced_logits(vlm, locality_images, local_ids) if local else []
        self.apply()
        try:
            nan = float("nan")
            out = dict(generalization=nan, n_heldout=0, n_heldout_excluded=len(held),
                       locality=nan, locality_kl=nan, n_locality=0)
            scored = [i for i, c in enumerate(held) if self._scorable(c.text)]
            if scored:
                images = [heldout_images[i] for i in scored]
                edited = vlm.describe(images, max_new_tokens=max_new_tokens)
                out["generalization"], _ = flip_share([held[i].text for i in scored],
                                                      [e.text for e in edited], self.source, self.target)
                out.update(n_heldout=len(scored), n_heldout_excluded=len(held) - len(scored))
            if local:
                edited = vlm.describe(list(locality_images), max_new_tokens=max_new_tokens)
                out["locality"] = float(np.mean([e.text == c.text for e, c in zip(edited, local)]))
                logits = teacher_forced_logits(vlm, locality_images, local_ids)
                kls = [_kl(c, e).mean() for c, e in zip(clean_logits, logits) if len(c)]
                out["locality_kl"] = float(torch.stack(kls).mean()) if kls else float("nan")
                out["n_locality"] = len(local)
        finally:
            if not was_applied:
                self.undo()
        self.report.update(**out)
        return out

    def measure_side_effects(self, heldout_images: Sequence = (), locality_images: Sequence = (),
                             max_new_tokens: int = 20) -> None:
        """:meth:`evaluate` an applied edit; for an unapplied one, :meth:`EditReport.not_applied`."""
        if self.applied:
            self.evaluate(heldout_images, locality_images, max_new_tokens)
        else:
            self.report.not_applied(len(heldout_images), len(locality_images))

    def settle(self, images: Sequence, keep_failed: bool, max_new_tokens: int = 20) -> "Edit":
        """Apply the edit if it converged (or ``keep_failed``) and score its success on
        ``images``: an unapplied edit leaves the model unchanged, so its captions are the
        clean ones (success 0 on the scorable images)."""
        if self.converged or keep_failed:
            self.apply()
            self.captions_after = [c.text for c in self.vlm.describe(images, max_new_tokens=max_new_tokens)]
        else:
            self.captions_after = list(self.captions_before)
        success, excluded = flip_share(self.captions_before, self.captions_after, self.source, self.target)
        self.report.update(applied=self.applied, success=success, n_excluded_target=excluded)
        return self

    def _scorable(self, clean_text: str) -> bool:
        """Whether an image with this clean caption can show a flip: it says the source, not the target."""
        return says(clean_text, self.source) and not says(clean_text, self.target)

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
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def summary(self) -> dict:
        """JSON-friendly description: source, target, units and metrics (NaN → ``None``)."""
        metrics = {k: None if isinstance(v, float) and v != v else v for k, v in self.metrics.items()}
        return dict(model=self.vlm.name, source=self.source, target=self.target,
                    units=[[int(l), int(u)] for l, u in self.units], **metrics)


def flip_share(clean: Sequence[str], edited: Sequence[str], source: str, target: str
               ) -> tuple[float, int]:
    """``(share, n_excluded)``: the share of captions that went from saying ``source`` to
    saying ``target`` and not ``source``, over the pairs whose ``clean`` caption says the
    source and not the target (NaN if none); ``n_excluded`` = clean captions that already
    said the target (for them, losing the source is no flip)."""
    pairs = [(c, e) for c, e in zip(clean, edited) if says(c, source)]
    kept = [(c, e) for c, e in pairs if not says(c, target)]
    flips = [says(e, target) and not says(e, source) for _, e in kept]
    return (float(np.mean(flips)) if flips else float("nan")), len(pairs) - len(kept)


def _kl(clean_logits: torch.Tensor, edited_logits: torch.Tensor) -> torch.Tensor:
    """``Float[Tensor, "S"]``: KL(softmax(clean) ‖ softmax(edited)) per row (caption step)."""
    p = torch.log_softmax(clean_logits.float(), -1)
    q = torch.log_softmax(edited_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1)


def edit_token(vlm, images: Sequence, source: str, target: str, units=None, unrelated: Sequence = (),
               config: EditConfig | None = None, captions: Sequence | None = None,
               progress: bool = False, **settings) -> Edit:
    """Learn deltas on the write vectors of ``units`` so that ``images`` say ``target``
    where they said ``source`` (see the module docstring for the design).

    ``images``: PIL images whose generated captions say ``source``. ``units``: the units to
    edit — ``Int[ndarray, "N 2"]`` of ``(layer, unit)``, or rows of a ``find_neurons`` table
    (e.g. ``units_of(table, source, k)``: the neurons found are the ones edited). Without
    ``units`` the top-``k`` units are chosen here by ``method``'s score for the source summed
    over ``images``: ``"contribution"`` (the paper's neurons), ``"gradient"`` /
    ``"gradient_image"`` (either gradient baseline) or ``"random"`` (``seed``-ed). ``unrelated``:
    images whose captions the edit must leave alone (their KL enters the loss).
    ``config`` / ``settings``: an :class:`EditConfig` and any of its fields by name
    (``k=5, steps=150, …``). ``captions``: the images' captions if already made (with
    activations when the units are to be chosen here); otherwise they are made here.

    Returns an applied :class:`Edit` if it converged (or ``keep_failed``); a failed edit
    comes back with ``applied=False``, ``converged=False`` and its ``final_margin``.
    ``success`` skips the images whose clean caption already says ``target``
    (``n_excluded_target``); a failed, unapplied edit scores 0 on the others (nothing flips).
    """
    config = EditConfig.of(config, **settings)
    images, unrelated = list(images), list(unrelated)
    check_edit(vlm, images, source, target, units, config)
    target_id = target_token(vlm, target)
    if captions is None:      # activations only when the units are chosen from them
        captions = vlm.describe(images, max_new_tokens=config.max_new_tokens,
                                activation="down_proj_input" if units is None else None)
    src_steps = source_steps(vlm, captions, source)
    source_id = captions[0].token_ids[src_steps[0]]
    if units is None:
        chosen = choose_units(vlm, captions, src_steps, source_id, config.k, config.method,
                              config.seed, images)
    else:
        chosen = given_units(vlm, units)
    others = vlm.describe(unrelated, max_new_tokens=config.max_new_tokens) if unrelated else []
    learned = learn_deltas(vlm, images, captions, src_steps, target_id, chosen, unrelated, others,
                           config, progress, label=f"edit {source}→{target}")
    edit = Edit.learned(vlm, source, target, target_id, learned, [c.text for c in captions],
                        unit_choice=config.method if units is None else "given")
    return edit.settle(images, config.keep_failed, config.max_new_tokens)
