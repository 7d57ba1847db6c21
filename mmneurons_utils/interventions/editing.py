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
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..method import scoring
from .causal import margin_and_prob
from ..method.identify import METHODS, logit_weights, unit_scores
from .ablation import added_deltas, as_units, column_snapshot
from ..model.offload import write_columns
from ..model.nouns import NounToken, locate_nouns, says
from ..model.teacher_forcing import caption_logits, teacher_forced_inputs, teacher_forced_logits
from ..model.vlm import EMBEDDED_MARKER
from ..store.results import respect_umask

UNIT_CHOICES = METHODS   # how edit_token picks its units when none are given


class EditInputError(ValueError):
    """A bad source, target, image set or edit setting (the message lists the choices)."""


def target_token(vlm, word: str) -> int:
    """The single token id of ``word``; ``EditInputError`` listing the choices otherwise."""
    vocabulary = vlm.noun_vocabulary
    if vocabulary is not None and word not in vocabulary:
        raise EditInputError(f"target {word!r} is not in the model's noun vocabulary; choose one "
                             f"of: {', '.join(sorted(vocabulary))}")
    ids = vlm.tokenizer.encode(word, add_special_tokens=False)
    ids = [i for i in ids if vlm.tokenizer.convert_ids_to_tokens(i) not in ("▁", "Ġ")]
    unk = vlm.tokenizer.unk_token_id
    if len(ids) != 1 or (unk is not None and ids[0] == unk):
        pieces = vlm.tokenizer.convert_ids_to_tokens(ids)
        raise EditInputError(f"target {word!r} is not one token of the vocabulary (it becomes "
                             f"{pieces}); choose a word the tokenizer keeps whole")
    return int(ids[0])


def _source_steps(vlm, captions, source: str) -> list[int]:
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


@dataclass
class Edit:
    """A learned edit: additive deltas ``Float[Tensor, "N D"]`` on the write vectors of ``units``.

    ``applied`` says whether the deltas are in the weights now. ``metrics`` holds
    ``success`` (share of the edit images whose new caption says the target and not the
    source, over those whose clean caption did not already say the target; NaN if none),
    ``n_excluded_target`` (the edit images left out of it), ``applied`` (the edit was put in
    the weights and measured: converged, or ``keep_failed``), ``converged``, ``final_margin``
    (min over edit images of the target's
    teacher-forced margin at the source step), ``steps``, ``n_neurons``, ``weight_norm``
    (‖Δ‖_F) and ``relative_norm`` (‖Δ‖_F / ‖W_out[:, units]‖_F), plus what
    :meth:`evaluate` adds.
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
    captions_after: list[str] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list, repr=False)
    applied: bool = False
    _originals: list[torch.Tensor] = field(default_factory=list, repr=False)

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
        self.metrics.update(out)
        return out

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
            respect_umask(tmp)      # mkdtemp's folder is 0700: readable by others as mkdir makes it
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


def edit_token(vlm, images: Sequence, source: str, target: str, units=None,
               method: str = "contribution", k: int = 5, unrelated: Sequence = (),
               steps: int = 150, lr: float = 5e-3, kl_weight: float = 1.0, norm_weight: float = 0.1,
               stop_margin: float = 1.0, keep_failed: bool = False, seed: int = 0,
               max_new_tokens: int = 20, progress: bool = False) -> Edit:
    """Learn deltas on the write vectors of ``units`` so that ``images`` say ``target``
    where they said ``source`` (see the module docstring for the design).

    ``images``: PIL images whose generated captions say ``source``. ``units``: the units to
    edit — ``Int[ndarray, "N 2"]`` of ``(layer, unit)``, or rows of a ``find_neurons`` table
    (e.g. ``units_of(table, source, k)``: the neurons found are the ones edited). Without
    ``units`` the top-``k`` units are chosen here by ``method``'s score for the source summed
    over ``images``: ``"contribution"`` (the paper's neurons), ``"gradient"`` /
    ``"gradient_image"`` (either gradient baseline) or ``"random"`` (``seed``-ed). ``unrelated``:
    images whose captions the edit must leave alone (their KL enters the loss).

    Returns an applied :class:`Edit` if it converged (or ``keep_failed``); a failed edit
    comes back with ``applied=False``, ``converged=False`` and its ``final_margin``.
    ``success`` skips the images whose clean caption already says ``target``
    (``n_excluded_target``); a failed, unapplied edit scores 0 on the others (nothing flips).
    """
    from tqdm.auto import tqdm

    images, unrelated = list(images), list(unrelated)
    if not images:
        raise EditInputError("no images to edit: pass at least one image whose caption says the source")
    if source == target:
        raise EditInputError(f"source and target are the same word ({source!r}); pick a different target")
    for name, value, lo in (("k", k, 1), ("steps", steps, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise EditInputError(f"{name} must be an integer ≥ {lo}, got {value!r}")
    if units is None and method not in UNIT_CHOICES:
        raise EditInputError(f"method must be one of {', '.join(UNIT_CHOICES)} (or pass units=), "
                             f"got {method!r}")
    if isinstance(units, str):
        raise EditInputError(f"units must be (layer, unit) pairs or table rows, got {units!r}; "
                             f"to choose them by a scoring method pass method={units!r}")
    target_id = target_token(vlm, target)
    captions = vlm.describe(images, max_new_tokens=max_new_tokens, activation="down_proj_input")
    src_steps = _source_steps(vlm, captions, source)
    source_id = captions[0].token_ids[src_steps[0]]
    if units is None:
        if k > vlm.n_layers * vlm.d_ff:
            raise EditInputError(f"k must be ≤ {vlm.n_layers * vlm.d_ff}, got {k}")
        chosen = choose_units(vlm, captions, src_steps, source_id, k, method, seed, images)
    else:
        try:
            given = as_units(vlm, units)
            chosen = given[np.sort(np.unique(given, axis=0, return_index=True)[1])]  # once each, in order
        except ValueError as exc:
            raise EditInputError(str(exc)) from exc
        if len(chosen) == 0:
            raise EditInputError("units is empty: pass at least one (layer, unit) pair")
    chosen = np.asarray(chosen, dtype=np.int64)

    # one teacher-forced batch: edit images first, then the unrelated ones
    others = vlm.describe(unrelated, max_new_tokens=max_new_tokens) if unrelated else []
    seqs = [c.token_ids for c in captions] + [c.token_ids for c in others]
    full, prompt_len, longest = teacher_forced_inputs(vlm, images + unrelated, seqs)
    rows = torch.arange(len(images))
    pos_src = torch.as_tensor(src_steps) + prompt_len - 1
    keep = torch.zeros(len(seqs), longest, dtype=torch.bool)           # KL positions: (B, S)
    for r, s in enumerate(seqs):
        keep[r, :len(s)] = True
    keep[rows, torch.as_tensor(src_steps)] = False
    keep = keep.to(vlm.device)

    originals = column_snapshot(vlm, chosen)
    w_norm2 = sum(float(o.float().pow(2).sum()) for o in originals)
    deltas = torch.zeros(len(chosen), originals[0].shape[0], device=vlm.device, requires_grad=True)

    def forward():                                                      # (B, S, V)
        return caption_logits(vlm, full, prompt_len, longest)

    flags = [p.requires_grad for p in vlm.model.parameters()]
    history: list[dict] = []
    converged, margin = False, float("-inf")
    try:
        for p in vlm.model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            clean = torch.log_softmax(forward(), -1)
        optimizer = torch.optim.Adam([deltas], lr=lr)
        with added_deltas(vlm, chosen, deltas):
            for step in tqdm(range(steps + 1), desc=f"edit {source}→{target}", disable=not progress):
                with torch.enable_grad():
                    logits = forward()
                    src_logits = logits[rows, pos_src - (prompt_len - 1)]       # (B_edit, V)
                    with torch.no_grad():
                        margins = torch.stack([torch.tensor(margin_and_prob(r, target_id)[0])
                                               for r in src_logits])
                    margin = float(margins.min())
                    logp = torch.log_softmax(logits, -1)
                    nll = -logp[rows, pos_src - (prompt_len - 1), target_id].mean()
                    kl = ((clean.exp() * (clean - logp)).sum(-1)[keep].mean() if keep.any()
                          else logp.new_zeros(()))
                    norm = deltas.pow(2).sum() / w_norm2
                    loss = nll + kl_weight * kl + norm_weight * norm
                    history.append(dict(step=step, loss=float(loss.detach()), nll=float(nll.detach()),
                                        kl=float(kl.detach()), norm=float(norm.detach()), margin=margin))
                    if margin > stop_margin:
                        converged = True
                        break
                    if step == steps:
                        break
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
    finally:
        for p, flag in zip(vlm.model.parameters(), flags):
            p.requires_grad_(flag)

    edit = Edit(vlm=vlm, source=source, target=target, target_id=target_id, units=chosen,
                deltas=deltas.detach().cpu(), converged=converged, final_margin=margin,
                steps=len(history) - 1, captions_before=[c.text for c in captions], history=history,
                _originals=originals)
    delta_norm = float(edit.deltas.norm())
    edit.metrics.update(converged=converged, final_margin=margin, steps=edit.steps,
                        n_neurons=len(chosen), unit_choice=method if units is None else "given",
                        weight_norm=delta_norm, relative_norm=delta_norm / max(w_norm2, 1e-30) ** 0.5)
    if converged or keep_failed:
        edit.apply()
        edit.captions_after = [c.text for c in vlm.describe(images, max_new_tokens=max_new_tokens)]
    else:  # the model is unchanged: its captions are the clean ones (success 0 on scorable images)
        edit.captions_after = list(edit.captions_before)
    success, excluded = flip_share(edit.captions_before, edit.captions_after, source, target)
    edit.metrics.update(applied=edit.applied, success=success, n_excluded_target=excluded)
    return edit
