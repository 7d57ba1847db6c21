"""The one suite of edit metrics: reliability, generality and locality as EasyEdit names them
for MMEdit, plus the side effects a caption edit can have away from images.

A *reference* is measured once on the unedited model (:func:`clean_reference`: the clean captions
of the edit, held-out and locality images, made once and reused by every edit of the same
request); :func:`edit_metrics` measures the same inputs on the edited model and compares. Given the
edit (``edit_metrics(vlm, ref, edit)``) it puts it in the weights for the measurement and leaves
them as it found them; the result goes into the edit's report.

Teacher-forced (EasyEdit's way) beside free-running (``*_free``), for every metric. The package's
older names are the free-running readings (:data:`ALIASES`): ``success`` = ``reliability_free``,
``generalization`` = ``m_generality_free``, ``locality`` = ``m_locality_free``; tables carry both.

* ``reliability``: the edit images, their clean captions teacher-forced: share whose argmax at
  the source noun's step is the target. ``reliability_free``: share whose new greedy caption
  says the target and not the source (the package's ``success``).
* ``m_generality``: the same on held-out images of the source (``generalization`` free-running).
* ``t_generality``: the held-out images with a paraphrased instruction (:data:`PARAPHRASE`):
  the clean model's caption under that prompt, scored where it says the source.
* ``m_locality``: unrelated images (captions without the source): EasyEdit's token agreement —
  mean over images of the share of caption steps whose edited argmax equals the clean argmax,
  teacher-forcing the clean caption. ``m_locality_free``: share of captions unchanged.
  ``locality_kl``: mean over those images of the mean over caption steps of KL(clean ‖ edited)
  (nats), from the same teacher-forced forward.
* ``t_locality``: fixed text-only prompts (:data:`TEXT_PROMPTS`, no image): token agreement on
  the unedited model's greedy continuations. Meaningful on a model with a pretrained language
  model (``smol-llava``); the tiny models read most of these words as ``<unk>``.
* ``no_image_locality``: the captioning prompt with the image removed ("… An image of"): token
  agreement on the unedited model's continuation (a coupled edit that makes the no-image
  continuation's own noun change lowers it; that is a side effect, too).
* ``text_transfer`` / ``decoupling``: the text-only prompt "… An image of a <source>" (each
  instruction, no image) teacher-forced: share of prompts where the edited model now predicts
  the target at the source's step (``text_transfer``); ``decoupling = 1 − text_transfer``
  (the image edit did not carry over to text). ``text_logit_gain``: mean change of
  ``logit(target) − logit(source)`` there.

The text-side metrics (``t_*``, ``no_image_locality``, ``text_transfer``, ``decoupling``,
``text_logit_gain``) are measured when the reference is ``extended`` (the editor comparison);
the batch edit table (``extended=False``) has the image-side ones only.

Images whose clean caption does not say the source, or already says the target, are not
scored for reliability / generality (the package's rule); a metric with nothing to score is NaN.
An edit that was not accepted (did not converge, not ``keep_failed``) is never put in the
weights: it scores 0 on reliability (nothing flips) and NaN on everything that would need it
applied (:func:`unapplied_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ..model.nouns import locate_nouns, says
from ..model.teacher_forcing import append_captions, caption_logits
from .text_twin import _text_decoder, text_prompt

PARAPHRASE = "What is in this picture?"
TEXT_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The opposite of hot is",
    "My favourite fruit is the",
    "In the morning I like to",
    "The sun rises in the",
    "a dog and a cat on a white",
    "Describe the image in few words.",
)
TEXT_TOKENS = 8      # greedy continuation length of each text-only prompt


# --- reading the model --------------------------------------------------------------------
@torch.no_grad()
def greedy_captions(vlm, images: Sequence, prompt: str | None = None, max_new_tokens: int = 20,
                    batch_size: int = 32) -> list[list[int]]:
    """Greedy caption token ids of ``images`` under ``prompt`` (default: the paper's), stopped at
    EOS / padding, the image placeholder suppressed (as :meth:`VLM.describe` does)."""
    eos = vlm.model.generation_config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos]) | {vlm.tokenizer.pad_token_id}
    suppress = sorted(set(vlm.model.generation_config.suppress_tokens or [])
                      | set(vlm.placeholder_token_ids)) or None
    out_ids: list[list[int]] = []
    images = list(images)
    for start in range(0, len(images), batch_size):
        enc = vlm.inputs(images[start:start + batch_size], prompt)
        out = vlm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 suppress_tokens=suppress)
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            out_ids.append(row[: next((j for j, t in enumerate(row) if t in stop), len(row))])
    return out_ids


@torch.no_grad()
def forced_argmax(vlm, images: Sequence, captions: Sequence[Sequence[int]],
                  prompt: str | None = None) -> list[torch.Tensor]:
    """Per image ``Int[Tensor, "S"]``: the argmax at each step of its caption, teacher-forced
    after ``prompt`` (``S`` = the caption's length)."""
    if not len(images):
        return []
    full, prompt_len, longest = append_captions(vlm.inputs(list(images), prompt), captions,
                                                vlm.tokenizer.pad_token_id or 0)
    if longest == 0:
        return [torch.zeros(0, dtype=torch.long) for _ in captions]
    top = caption_logits(vlm, full, prompt_len, longest).argmax(-1).cpu()
    return [top[r, :len(c)] for r, c in enumerate(captions)]


@torch.no_grad()
def _text_logits(vlm, ids: Sequence[int]) -> torch.Tensor:
    """``Float[Tensor, "T V"]``: the language model's logits over text ``ids`` alone (no image)."""
    x = torch.as_tensor([list(ids)], device=vlm.device)
    hidden = _text_decoder(vlm)(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
    return vlm.lm_head(hidden.to(vlm.lm_head.weight.device))[0].float().cpu()


def _prompt_ids(vlm, text: str) -> list[int]:
    return vlm.tokenizer(text)["input_ids"]


@torch.no_grad()
def text_continuation(vlm, prompt: str, n_tokens: int = TEXT_TOKENS) -> list[int]:
    """The greedy continuation (``n_tokens`` ids) of a text-only ``prompt``."""
    ids = _prompt_ids(vlm, prompt)
    out: list[int] = []
    for _ in range(n_tokens):
        out.append(int(_text_logits(vlm, ids + out)[-1].argmax()))
    return out


def text_forced_argmax(vlm, prompt: str, continuation: Sequence[int]) -> torch.Tensor:
    """``Int[Tensor, "S"]``: the argmax that predicts each token of ``continuation`` after the
    text-only ``prompt``, teacher-forced."""
    ids = _prompt_ids(vlm, prompt)
    logits = _text_logits(vlm, ids + list(continuation))
    return logits[len(ids) - 1: len(ids) - 1 + len(continuation)].argmax(-1)


def no_image_prompt(vlm, instruction: str | None = None) -> str:
    """The captioning prompt ("… An image of") with its image placeholder removed."""
    image = getattr(vlm.processor, "image_token", "<image>")
    image = getattr(image, "content", image)
    prompt = vlm.prompt() if instruction is None else vlm.prompt(instruction=instruction)
    return prompt.replace(f"{image}\n", "").replace(image, "")


def _source_logits(vlm, source: str, instruction: str | None) -> tuple[torch.Tensor, int] | None:
    """``(Float[Tensor, "V"], source id)``: logits predicting ``source``'s first token in the
    text-only "… An image of a <source>" prompt; ``None`` if the tokenizer splits it oddly."""
    text = text_prompt(vlm, source)
    if instruction is not None:
        text = text.replace(no_image_prompt(vlm), no_image_prompt(vlm, instruction))
    ids = _prompt_ids(vlm, text)
    tail = max(0, len(ids) - 6)
    found = locate_nouns(vlm.tokenizer, ids[tail:], [source])
    if not found:
        return None
    position = tail + found[0].step - 1
    return _text_logits(vlm, ids)[position], found[0].token_id


# --- reference and comparison ---------------------------------------------------------------
ALIASES = {"success": "reliability_free", "generalization": "m_generality_free",
           "locality": "m_locality_free"}
"""The package's earlier names of the free-running metrics: ``alias → EasyEdit-style name``."""


@dataclass
class CleanReference:
    """What the unedited model did on an edit's probe inputs (see the module doc), measured once.

    ``*_ids``: caption token ids per image; ``*_steps``: the source's step per image (``None``
    where the image is not scored: no source, or the target already said); ``local_logits``:
    per locality image ``Float[Tensor, "S V"]``, the clean teacher-forced logits (for the KL and
    the token agreement). The text-side fields are filled only when ``extended``.
    """

    source: str
    target: str
    target_id: int
    edit_images: list
    heldout_images: list
    locality_images: list
    edit_ids: list = field(default_factory=list)
    edit_steps: list = field(default_factory=list)
    heldout_ids: list = field(default_factory=list)
    heldout_steps: list = field(default_factory=list)
    para_ids: list = field(default_factory=list)
    para_steps: list = field(default_factory=list)
    para_texts: list = field(default_factory=list)
    local_ids: list = field(default_factory=list)
    local_argmax: list = field(default_factory=list)
    local_logits: list = field(default_factory=list, repr=False)
    local_texts: list = field(default_factory=list)
    text_prompts: tuple = TEXT_PROMPTS
    text_ids: list = field(default_factory=list)
    no_image_ids: list = field(default_factory=list)
    source_text: list = field(default_factory=list)     # (instruction, logits, source id)
    paraphrase: str = PARAPHRASE
    max_new_tokens: int = 20
    extended: bool = True


def _decode(vlm, ids) -> str:
    return vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()


def _scored_steps(vlm, captions: Sequence[Sequence[int]], source: str, target: str) -> list:
    """The source's step in each caption that says it and not ``target``, else ``None``."""
    steps = []
    for ids in captions:
        text = _decode(vlm, ids)
        found = locate_nouns(vlm.tokenizer, list(ids), [source]) if says(text, source) else []
        steps.append(found[0].step if found and not says(text, target) else None)
    return steps


@torch.no_grad()
def _forced_logits(vlm, images: Sequence, captions: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Per image ``Float[Tensor, "S V"]`` (CPU): teacher-forced logits of its caption, one batch."""
    if not len(images):
        return []
    full, prompt_len, longest = append_captions(vlm.inputs(list(images)), captions,
                                                vlm.tokenizer.pad_token_id or 0)
    if longest == 0:
        return [torch.zeros(0, vlm.lm_head.out_features) for _ in captions]
    logits = caption_logits(vlm, full, prompt_len, longest)
    return [logits[r, :len(c)].cpu() for r, c in enumerate(captions)]


def clean_reference(vlm, source: str, target: str, target_id: int, edit_images: Sequence,
                    heldout_images: Sequence = (), locality_images: Sequence = (),
                    paraphrase: str = PARAPHRASE, text_prompts: Sequence[str] = TEXT_PROMPTS,
                    max_new_tokens: int = 20, edit_captions: Sequence | None = None,
                    extended: bool = True) -> CleanReference:
    """Measure the unedited model (it must be unedited now) on every probe input, once.

    ``edit_captions``: the edit images' clean captions if already made (``Caption`` objects or
    token-id lists; e.g. the ones the edit learns from), else they are made here. ``extended``:
    also the text-side probes (paraphrased instruction, text-only prompts, the no-image prompt)."""
    ref = CleanReference(source, target, target_id, list(edit_images), list(heldout_images),
                         list(locality_images), text_prompts=tuple(text_prompts),
                         paraphrase=paraphrase, max_new_tokens=max_new_tokens, extended=extended)
    if edit_captions is not None:
        ref.edit_ids = [list(getattr(c, "token_ids", c)) for c in edit_captions]
    else:
        ref.edit_ids = greedy_captions(vlm, ref.edit_images, max_new_tokens=max_new_tokens) if edit_images else []
    ref.edit_steps = _scored_steps(vlm, ref.edit_ids, source, target)
    ref.heldout_ids = greedy_captions(vlm, ref.heldout_images, max_new_tokens=max_new_tokens) if heldout_images else []
    ref.heldout_steps = _scored_steps(vlm, ref.heldout_ids, source, target)
    ref.local_ids = greedy_captions(vlm, ref.locality_images, max_new_tokens=max_new_tokens) if locality_images else []
    ref.local_logits = _forced_logits(vlm, ref.locality_images, ref.local_ids)
    ref.local_argmax = [l.argmax(-1) for l in ref.local_logits]
    ref.local_texts = [_decode(vlm, ids) for ids in ref.local_ids]
    if extended:
        para = vlm.prompt(instruction=paraphrase)
        ref.para_ids = greedy_captions(vlm, ref.heldout_images, para, max_new_tokens) if heldout_images else []
        ref.para_steps = _scored_steps(vlm, ref.para_ids, source, target)
        ref.para_texts = [_decode(vlm, ids) for ids in ref.para_ids]
        ref.text_ids = [text_continuation(vlm, p) for p in ref.text_prompts]
        ref.no_image_ids = text_continuation(vlm, no_image_prompt(vlm))
        ref.source_text = [(instruction, *found) for instruction in (None, paraphrase)
                           if (found := _source_logits(vlm, source, instruction)) is not None]
    return ref


def _mean(values) -> float:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else float("nan")


def _agreement(before: Sequence[torch.Tensor], after: Sequence[torch.Tensor]) -> float:
    """EasyEdit's locality: mean over items of the share of positions whose argmax agrees."""
    return _mean(torch.eq(b, a).float().mean() for b, a in zip(before, after) if len(b))


def _target_share(vlm, images, captions, steps, target_id, prompt=None) -> float:
    """Share of the scored images whose teacher-forced argmax at the source step is the target."""
    rows = [i for i, s in enumerate(steps) if s is not None]
    if not rows:
        return float("nan")
    top = forced_argmax(vlm, [images[i] for i in rows], [captions[i][:steps[i] + 1] for i in rows], prompt)
    return _mean(int(t[steps[i]]) == target_id for t, i in zip(top, rows))


def _flip_share(vlm, images, captions, steps, source, target, prompt=None, max_new_tokens=20) -> float:
    """Share of the scored images whose new greedy caption says the target and not the source."""
    rows = [i for i, s in enumerate(steps) if s is not None]
    if not rows:
        return float("nan")
    new = greedy_captions(vlm, [images[i] for i in rows], prompt, max_new_tokens)
    return _mean(says(t, target) and not says(t, source) for t in (_decode(vlm, ids) for ids in new))


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


IMAGE_KEYS = ("reliability", "reliability_free", "m_generality", "m_generality_free",
              "m_locality", "m_locality_free", "locality_kl")
TEXT_KEYS = ("t_generality", "t_generality_free", "t_locality", "t_locality_free",
             "no_image_locality", "text_transfer", "decoupling", "text_logit_gain")
COUNT_KEYS = ("n_heldout", "n_heldout_excluded", "n_locality", "n_t_generality")


@torch.no_grad()
def _measure(vlm, ref: CleanReference, reliability_free: float | None = None) -> dict:
    """The metrics for the model as it is now (edited) against ``ref``."""
    out: dict = {}
    n = ref.max_new_tokens
    out["reliability"] = _target_share(vlm, ref.edit_images, ref.edit_ids, ref.edit_steps, ref.target_id)
    out["reliability_free"] = (reliability_free if reliability_free is not None else
                               _flip_share(vlm, ref.edit_images, ref.edit_ids, ref.edit_steps,
                                           ref.source, ref.target, None, n))
    out["m_generality"] = _target_share(vlm, ref.heldout_images, ref.heldout_ids, ref.heldout_steps,
                                        ref.target_id)
    out["m_generality_free"] = _flip_share(vlm, ref.heldout_images, ref.heldout_ids, ref.heldout_steps,
                                           ref.source, ref.target, None, n)
    scored = sum(s is not None for s in ref.heldout_steps)
    out["n_heldout"], out["n_heldout_excluded"] = scored, len(ref.heldout_ids) - scored
    if ref.locality_images:
        logits = _forced_logits(vlm, ref.locality_images, ref.local_ids)
        out["m_locality"] = _agreement(ref.local_argmax, [l.argmax(-1) for l in logits])
        new = greedy_captions(vlm, ref.locality_images, max_new_tokens=n)
        out["m_locality_free"] = _mean(_decode(vlm, ids) == t for ids, t in zip(new, ref.local_texts))
        kls = [_kl(c, e).mean() for c, e in zip(ref.local_logits, logits) if len(c)]
        out["locality_kl"] = float(torch.stack(kls).mean()) if kls else float("nan")
    else:
        out["m_locality"] = out["m_locality_free"] = out["locality_kl"] = float("nan")
    out["n_locality"] = len(ref.locality_images)
    if not ref.extended:
        return out
    para = vlm.prompt(instruction=ref.paraphrase)
    out["t_generality"] = _target_share(vlm, ref.heldout_images, ref.para_ids, ref.para_steps,
                                        ref.target_id, para)
    out["t_generality_free"] = _flip_share(vlm, ref.heldout_images, ref.para_ids, ref.para_steps,
                                           ref.source, ref.target, para, n)
    out["n_t_generality"] = sum(s is not None for s in ref.para_steps)
    ids = [torch.as_tensor(c) for c in ref.text_ids]
    out["t_locality"] = _agreement(ids, [text_forced_argmax(vlm, p, c)
                                         for p, c in zip(ref.text_prompts, ref.text_ids)])
    out["t_locality_free"] = _mean(text_continuation(vlm, p, len(c)) == list(c)
                                   for p, c in zip(ref.text_prompts, ref.text_ids))
    out["no_image_locality"] = _agreement([torch.as_tensor(ref.no_image_ids)],
                                          [text_forced_argmax(vlm, no_image_prompt(vlm), ref.no_image_ids)])
    transfer, gain = [], []
    for instruction, clean, source_id in ref.source_text:
        now = _source_logits(vlm, ref.source, instruction)[0]
        transfer.append(int(now.argmax()) == ref.target_id)
        gain.append(float((now[ref.target_id] - now[source_id]) - (clean[ref.target_id] - clean[source_id])))
    out["text_transfer"] = _mean(transfer)
    out["decoupling"] = 1.0 - out["text_transfer"] if transfer else float("nan")
    out["text_logit_gain"] = _mean(gain)
    return out


def unapplied_metrics(ref: CleanReference) -> dict:
    """The rule for an edit that was never put in the weights: reliability 0 (its images keep
    saying the source: nothing flips), text transfer 0, and NaN for every side effect (the
    unchanged model's "nothing moved" would say nothing about the edit)."""
    nan = float("nan")
    out = {key: nan for key in IMAGE_KEYS + (TEXT_KEYS if ref.extended else ())}
    out.update(reliability=0.0, reliability_free=0.0, n_heldout=len(ref.heldout_images),
               n_heldout_excluded=0, n_locality=len(ref.locality_images))
    if ref.extended:
        out.update(text_transfer=0.0, n_t_generality=0)
    return out


def with_aliases(metrics: dict) -> dict:
    """``metrics`` with the package's earlier names added beside the EasyEdit-style ones."""
    return {**metrics, **{alias: metrics[name] for alias, name in ALIASES.items() if name in metrics}}


def edit_metrics(vlm, ref: CleanReference, edit=None) -> dict:
    """The metrics of the module doc against ``ref``, with :data:`ALIASES`.

    Without ``edit``: the model as it is now (it may be edited in any way). With ``edit`` (an
    :class:`~mmneurons_utils.interventions.editing.Edit`): an accepted edit is put in the weights
    for the measurement and the weights are left as they were found (its reliability_free is its
    report's, scored when it was accepted, not captioned again); an edit that was not accepted
    gets :func:`unapplied_metrics`."""
    if edit is None:
        return with_aliases(_measure(vlm, ref))
    report = edit.report
    if not report.accepted:   # its reliability_free was scored on its (clean) captions: 0
        return with_aliases({**unapplied_metrics(ref), "reliability_free": report.reliability_free})
    was_applied = edit.applied
    edit.apply()
    try:
        return with_aliases(_measure(vlm, ref, reliability_free=report.reliability_free))
    finally:
        if not was_applied:
            edit.undo()


METRIC_KEYS = ("reliability", "reliability_free", "m_generality", "m_generality_free",
               "t_generality", "t_generality_free", "m_locality", "m_locality_free",
               "t_locality", "t_locality_free", "no_image_locality", "text_transfer", "decoupling",
               "text_logit_gain")
"""The columns of the editor comparison (EasyEdit's metrics, teacher-forced and free-running)."""
