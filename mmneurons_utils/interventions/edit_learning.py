"""Learning an edit, apart from applying it (as ROME keeps ``execute_rome`` apart from
``apply_rome_to_model``): :func:`learn_deltas` trains one additive delta per write vector and
leaves the model exactly as it found it; :class:`~.editing.Edit` writes them.

The settings and their defaults are one :class:`EditConfig`. The loss, per step, over one
teacher-forced forward of prompt + *original* caption (see :mod:`.editing` for why):
``−log p(target)`` at the source's step of each edit image, ``kl_weight ·`` KL(original ‖
edited) at every other step and at every step of the unrelated images' captions, and
``norm_weight · ‖Δ‖² / ‖W_out[:, units]‖²``. Training stops as soon as the target beats every
other token by ``stop_margin`` logits at the source step of every edit image, or after
``steps`` steps (then the edit did not converge).

Learning is cached in memory by its settings (:data:`EDIT_CACHE`): the same request on the same
weights returns the deltas learned the first time instead of running Adam again.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict
from dataclasses import astuple, dataclass, field, fields
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..method.identify import METHODS
from ..model.cache import weights_hash
from ..store.provenance import image_hash
from ..model.teacher_forcing import caption_logits, teacher_forced_inputs
from .ablation import added_deltas, column_snapshot
from .causal import margin_and_prob


class EditInputError(ValueError):
    """A bad source, target, image set or edit setting (the message lists the choices)."""


@dataclass(frozen=True)
class EditConfig:
    """An edit's settings. ``method`` / ``k``: how the units are chosen when none are given
    (``k`` units by ``method``'s score, one of ``METHODS``; ``seed`` for ``"random"``);
    ``steps``, ``lr`` (Adam), ``kl_weight``, ``norm_weight``, ``stop_margin``: the training;
    ``keep_failed``: apply an edit that did not converge; ``max_new_tokens``: the captions."""

    method: str = "contribution"
    k: int = 5
    steps: int = 150
    lr: float = 5e-3
    kl_weight: float = 1.0
    norm_weight: float = 0.1
    stop_margin: float = 1.0
    keep_failed: bool = False
    seed: int = 0
    max_new_tokens: int = 20

    def __post_init__(self):
        for name, value in (("k", self.k), ("steps", self.steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise EditInputError(f"{name} must be an integer ≥ 1, got {value!r}")

    @classmethod
    def of(cls, config: "EditConfig | None" = None, **settings) -> "EditConfig":
        """``config`` (default: the defaults) with ``settings`` replaced; an unknown setting is
        an ``EditInputError`` naming the known ones."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise EditInputError(f"unknown edit setting(s) {', '.join(unknown)}; the settings are "
                                 f"{', '.join(names)}")
        base = {name: getattr(config or cls(), name) for name in names}
        return cls(**{**base, **settings})


@dataclass
class LearnedDeltas:
    """What :func:`learn_deltas` learned: ``deltas`` (``Float[Tensor, "N D"]``, on the CPU) for
    the write vectors of ``units`` (``Int[ndarray, "N 2"]``), the clones of those columns
    (``originals``, one ``Float[Tensor, "D"]`` each), whether it ``converged``, the
    ``final_margin`` (min over edit images of the target's margin at the source step), the
    per-step ``history`` and ``weight_norm`` (‖Δ‖_F) / ``relative_norm`` (‖Δ‖_F / ‖W_out[:, units]‖_F)."""

    units: np.ndarray
    deltas: torch.Tensor
    originals: list[torch.Tensor]
    converged: bool
    final_margin: float
    history: list[dict] = field(repr=False)
    weight_norm: float = 0.0
    relative_norm: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.history) - 1


class EditCache:
    """What edits learned, in memory, keyed by everything that decides it (:func:`edit_key`):
    the model object and a hash of its weights (``W_U`` and every ``W_out``, full bytes: an
    applied edit or ablation changes it), the content hashes of the edit and unrelated images,
    their caption token ids and source steps, the target token, the units (or the editor and its
    layer), every :class:`EditConfig` field and the editor's own inputs (ROME's covariance
    images). A hit returns a copy (the cached tensors are never handed out); ``hits`` /
    ``misses`` count lookups; the oldest of more than ``size`` entries is dropped."""

    def __init__(self, size: int = 256):
        self.size, self.hits, self.misses = size, 0, 0
        self._store: OrderedDict[str, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
        self.hits = self.misses = 0

    def get(self, key: str | None, compute: Callable[[], object]):
        """The value cached under ``key`` (a copy), else ``compute()``, stored (``key=None``:
        not cached)."""
        if key is None:
            return compute()
        if key in self._store:
            self.hits += 1
            self._store.move_to_end(key)
            return copy.deepcopy(self._store[key])
        self.misses += 1
        value = compute()
        self._store[key] = copy.deepcopy(value)
        while len(self._store) > self.size:
            self._store.popitem(last=False)
        return value


EDIT_CACHE = EditCache()
"""The session's cache of learned edits (``EDIT_CACHE.clear()`` empties it)."""


def edit_key(vlm, kind: str, images: Sequence, captions: Sequence, source_steps: Sequence[int],
             target_id: int, units, unrelated: Sequence, unrelated_captions: Sequence,
             config: EditConfig, extra: Sequence = ()) -> str:
    """The settings of one learned edit as a hex key (see :class:`EditCache`)."""
    digest = hashlib.blake2b(digest_size=20)
    parts = [kind, id(vlm.model), vlm.name, weights_hash(vlm),
             [image_hash(im) for im in images], [list(c.token_ids) for c in captions],
             [int(s) for s in source_steps], int(target_id),
             np.asarray(units, dtype=np.int64).tolist() if units is not None else None,
             [image_hash(im) for im in unrelated], [list(c.token_ids) for c in unrelated_captions],
             astuple(config), list(extra)]
    digest.update(repr(parts).encode())
    return digest.hexdigest()


def learn_deltas(vlm, images: Sequence, captions: Sequence, source_steps: Sequence[int],
                 target_id: int, units: np.ndarray, unrelated: Sequence = (),
                 unrelated_captions: Sequence = (), config: EditConfig = EditConfig(),
                 progress: bool = False, label: str = "edit", cache: bool = True) -> LearnedDeltas:
    """Learn one delta per write vector of ``units`` so that each of ``images`` says
    ``target_id`` at its ``source_steps`` step (of its ``captions``), leaving the
    ``unrelated_captions`` of ``unrelated`` alone.

    Pure: the weights are never written (the deltas act through a forward hook, removed on
    exit) and every parameter's ``requires_grad`` is restored, also on an exception.
    ``cache``: serve the same request on the same weights from :data:`EDIT_CACHE`.
    """
    units = np.asarray(units, dtype=np.int64)
    key = (edit_key(vlm, "deltas", images, captions, source_steps, target_id, units, unrelated,
                    unrelated_captions, config) if cache else None)
    return EDIT_CACHE.get(key, lambda: _learn_deltas(vlm, images, captions, source_steps, target_id,
                                                     units, unrelated, unrelated_captions, config,
                                                     progress, label))


def _learn_deltas(vlm, images, captions, source_steps, target_id, units, unrelated,
                  unrelated_captions, config, progress, label) -> LearnedDeltas:
    batch = EditBatch.build(vlm, list(images), list(captions), source_steps,
                             list(unrelated), list(unrelated_captions))
    originals = column_snapshot(vlm, units)
    w_norm2 = sum(float(o.float().pow(2).sum()) for o in originals)
    deltas = torch.zeros(len(units), originals[0].shape[0], device=vlm.device, requires_grad=True)
    flags = [p.requires_grad for p in vlm.model.parameters()]
    try:
        for p in vlm.model.parameters():
            p.requires_grad_(False)
        history, converged = _train(vlm, batch, units, deltas, target_id, w_norm2, config,
                                    progress, label)
    finally:
        for p, flag in zip(vlm.model.parameters(), flags):
            p.requires_grad_(flag)
    learned = deltas.detach().cpu()
    norm = float(learned.norm())
    return LearnedDeltas(units, learned, originals, converged, history[-1]["margin"] if history
                         else float("-inf"), history, norm, norm / max(w_norm2, 1e-30) ** 0.5)


@dataclass
class EditBatch:
    """One teacher-forced batch: the edit images first, then the unrelated ones.
    ``keep``: ``Bool[Tensor, "B S"]``, the caption steps that enter the KL term."""

    full: dict
    prompt_len: int
    longest: int
    rows: torch.Tensor
    source_steps: torch.Tensor
    keep: torch.Tensor

    @classmethod
    def build(cls, vlm, images, captions, source_steps, unrelated, unrelated_captions) -> "EditBatch":
        seqs = [c.token_ids for c in captions] + [c.token_ids for c in unrelated_captions]
        full, prompt_len, longest = teacher_forced_inputs(vlm, images + unrelated, seqs)
        rows = torch.arange(len(images))
        keep = torch.zeros(len(seqs), longest, dtype=torch.bool)          # KL positions: (B, S)
        for r, s in enumerate(seqs):
            keep[r, :len(s)] = True
        keep[rows, torch.as_tensor(source_steps)] = False
        return cls(full, prompt_len, longest, rows, torch.as_tensor(source_steps), keep.to(vlm.device))

    def logits(self, vlm) -> torch.Tensor:                                 # (B, S, V)
        return caption_logits(vlm, self.full, self.prompt_len, self.longest)


def _train(vlm, batch: "EditBatch", units, deltas, target_id, w_norm2, config: EditConfig,
           progress: bool, label: str) -> tuple[list[dict], bool]:
    """Adam on ``deltas`` (added to the units' write vectors) with :func:`fit_edit`:
    ``(history, converged)``."""
    with torch.no_grad():
        clean = torch.log_softmax(batch.logits(vlm), -1)
    with added_deltas(vlm, units, deltas):
        return fit_edit(vlm, batch, [deltas], lambda: deltas.pow(2).sum() / w_norm2, target_id,
                        config, progress, label, clean)


def fit_edit(vlm, batch: "EditBatch", params: list[torch.Tensor], penalty, target_id: int,
             config: EditConfig, progress: bool, label: str, clean: torch.Tensor,
             project=None) -> tuple[list[dict], bool]:
    """The edit's loss and stopping rule, for any parametrisation of the change (the deltas on
    units' write vectors, a whole ``down_proj``, an adapter, ROME's value): Adam on ``params``
    (lr ``config.lr``) on ``−log p(target)`` at the source steps + ``kl_weight`` · KL(clean ‖
    edited) at the other kept positions + ``norm_weight · penalty()``, until the target's margin
    passes ``stop_margin`` at every edit image or ``steps`` run out: ``(history, converged)``.
    ``clean``: ``Float[Tensor, "B S V"]`` log-probabilities of the unedited model; ``project``:
    called after each step (e.g. ROME's norm clamp)."""
    optimizer = torch.optim.Adam(params, lr=config.lr)
    history: list[dict] = []
    for step in tqdm(range(config.steps + 1), desc=label, disable=not progress):
        with torch.enable_grad():
            logits = batch.logits(vlm)
            src_logits = logits[batch.rows, batch.source_steps]             # (B_edit, V)
            with torch.no_grad():
                margins = torch.stack([torch.tensor(margin_and_prob(r, target_id)[0])
                                       for r in src_logits])
            margin = float(margins.min())
            logp = torch.log_softmax(logits, -1)
            nll = -logp[batch.rows, batch.source_steps, target_id].mean()
            kl = ((clean.exp() * (clean - logp)).sum(-1)[batch.keep].mean() if batch.keep.any()
                  else logp.new_zeros(()))
            norm = penalty()
            loss = nll + config.kl_weight * kl + config.norm_weight * norm
            history.append(dict(step=step, loss=float(loss.detach()), nll=float(nll.detach()),
                                kl=float(kl.detach()), norm=float(norm.detach()), margin=margin))
            if margin > config.stop_margin:
                return history, True
            if step == config.steps:
                return history, False
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if project is not None:
                project()
    return history, False


UNIT_CHOICES = METHODS   # how edit_token picks its units when none are given
