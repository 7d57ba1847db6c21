"""The text twin of a noun's multi-modal neurons: the units that write it with no image at all.

A language model pretrained on text already had units that write " dog" before it saw an
image. The twin is found on the **pure language model** — no image, and for ``smol-llava``
without the low-rank adapters that were trained for images (:func:`language_model_only`) —
from **cloze prompts whose greedy answer is the noun**: a prompt counts only when the noun's
first sub-token (as a caption writes it, ``Ġdog``) is the arg-max of the next-token
distribution, and its probability is reported. Two kinds of prompt (:data:`TEMPLATES`):

* ``definitional`` (raw text, few-shot riddles): three solved riddles about nouns outside the
  scene set (zebra, train, chair), then the noun's riddle from :data:`CLUES`, answered up to
  the article (``Q: Which pet animal barks and wags its tail?\\nA: a``);
* ``context`` (the noun is in the prompt and the model repeats it): two raw-text sentences and
  one question in the model's own chat format (the paper's prompt with the image removed and
  another instruction/answer);
* ``paper`` (the previous twin, kept only where it passes the same greedy check): the paper's
  prompt with the image removed, ``… An image of a``.

At the position that predicts the noun each kept prompt gives the contribution score
``a · (W_U[t] · W_out)`` (activations: the input of ``down_proj``); the scores are averaged
over the noun's kept prompts and its top-``k`` units are compared with the image-driven top-``k``
of a ``find_neurons`` table (pooled over images as
:func:`~mmneurons_utils.method.identification.units_of` does).

Baselines: ``k`` uniformly random units (chance is ``k / (L · F)``), and the text units of the
*other* nouns (does the overlap name this noun, or just the units every noun uses?).

The tiny embedded models (word-level 75-token vocabularies, trained only to caption images)
were never language models: almost no prompt makes them say a noun with no image, and their
rows say so (``status``) with the overlap left NaN.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from ..model import architectures as A
from ..model import pretrained_lm as P
from ..model.loading import read_marker
from ..model.embedded import model_folder
from ..method.identification import Identification, units_of
from ..method.identify import contrast_weights
from ..model.nouns import noun_token_id
from ..method.scoring import contribution_scores, random_units, top_units, unit_logit_weights
from ..model.trace import trace_down_proj

try:   # adapters a model may still carry while it is trained (smol-llava's training build)
    from peft.tuners.tuners_utils import BaseTunerLayer
except ImportError:   # peft absent: nothing can have been injected by it
    BaseTunerLayer = ()

OK = "ok"
SILENT = "no prompt makes the model say it"

#: One riddle per scene noun (``tiny/scenes.py``), none naming its answer. Other nouns get
#: the context prompts only, unless the caller passes ``clues``.
CLUES: dict[str, str] = {
    "dog": "Which pet animal barks and wags its tail?",
    "cat": "Which pet animal meows and purrs?",
    "car": "Which vehicle with four wheels do people drive on roads?",
    "tree": "Which tall plant has a trunk, branches and leaves?",
    "apple": "Which round red fruit grows on trees and keeps the doctor away?",
    "bird": "Which animal has feathers and wings and can fly?",
    "fish": "Which animal lives in water and breathes with gills?",
    "house": "In which building does a family live?",
    "horse": "Which animal with a mane and hooves do people ride?",
    "cow": "Which farm animal gives milk and says moo?",
    "pig": "Which pink farm animal says oink?",
    "rabbit": "Which animal with long ears hops and eats carrots?",
    "elephant": "Which huge grey animal has a trunk and tusks?",
    "snake": "Which long reptile has no legs and hisses?",
    "turtle": "Which slow reptile carries a shell on its back?",
    "bee": "Which insect makes honey and buzzes?",
    "duck": "Which bird swims on ponds and says quack?",
    "banana": "Which long yellow fruit do monkeys love?",
    "lemon": "Which sour yellow citrus fruit is squeezed for its juice?",
    "pizza": "Which Italian dish is a flat round bread with tomato sauce and cheese?",
    "cake": "Which sweet baked dessert is eaten at birthday parties with candles?",
    "carrot": "Which orange root vegetable do rabbits love?",
    "bus": "Which large vehicle carries many passengers around a city?",
    "bicycle": "Which vehicle has two wheels and pedals?",
    "plane": "Which vehicle with wings flies passengers through the sky?",
    "boat": "Which vehicle floats and travels on water?",
    "rocket": "Which vehicle launches astronauts into space?",
    "ball": "Which round toy do children kick or throw in games?",
    "guitar": "Which musical instrument has six strings and is strummed?",
    "umbrella": "What do you open over your head to stay dry in the rain?",
    "key": "What small metal object do you turn in a lock to open a door?",
    "clock": "What object on the wall tells you the time?",
    "hat": "What do you wear on your head to keep the sun off?",
    "shoe": "What do you wear on each foot when you walk outside?",
    "flower": "Which colourful part of a plant has petals and smells nice?",
    "star": "What twinkles in the night sky?",
    "bell": "Which hollow metal object rings in a church tower?",
    "cup": "What small container with a handle do you drink tea from?",
    "mushroom": "Which fungus with a cap and a stem grows in forests?",
    "whale": "Which is the largest animal in the ocean?",
    "cactus": "Which spiky plant grows in the desert?",
    "octopus": "Which sea animal has eight arms?",
    "truck": "Which large vehicle carries heavy loads on roads?",
    "moon": "What shines in the night sky and goes around the Earth?",
}
#: the solved riddles in front of each definitional prompt (nouns outside the scene set)
SHOTS = (("Which animal has black and white stripes?", "a zebra"),
         ("Which vehicle runs on rails?", "a train"),
         ("What do you sit on at a table?", "a chair"))


def article(noun: str) -> str:
    return "an" if noun[0].lower() in "aeiou" else "a"


def _chat(vlm, question: str, answer: str) -> str:
    """The model's own prompt format with the image removed: ``question`` as the
    instruction, the answer begun with ``answer``."""
    image = getattr(vlm.processor, "image_token", "<image>")
    image = getattr(image, "content", image)
    return vlm.prompt(question, answer).replace(f"{image}\n", "").replace(image, "")


@dataclass(frozen=True)
class Template:
    """A cloze prompt: ``build(vlm, noun, clue)`` is the text up to (not including) the noun,
    ``None`` when the template does not apply (no clue for a definitional one)."""
    name: str
    kind: str        # "definitional" | "context" | "paper"
    form: str        # "raw text" | "chat" (the model's own prompt format, image removed)
    build: Callable[..., "str | None"] = field(repr=False)


def _riddle(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}"


TEMPLATES: tuple[Template, ...] = (
    Template("riddle", "definitional", "raw text", lambda vlm, n, clue: None if clue is None else
             "".join(_riddle(q, a) + "\n" for q, a in SHOTS) + _riddle(clue, article(n))),
    Template("riddle_long", "definitional", "raw text", lambda vlm, n, clue: None if clue is None else
             "".join(f"Question: {q}\nAnswer: {a}.\n\n" for q, a in SHOTS)
             + f"Question: {clue}\nAnswer: {article(n)}"),
    Template("picture", "context", "raw text", lambda vlm, n, clue:
             f"Here is a picture of {article(n)} {n}. This picture shows {article(n)}"),
    Template("park", "context", "raw text", lambda vlm, n, clue:
             f"I saw {article(n)} {n} in the park. The thing I saw was {article(n)}"),
    Template("have", "context", "chat", lambda vlm, n, clue:
             _chat(vlm, f"I have {article(n)} {n}. What do I have?", f"You have {article(n)}")),
    Template("paper", "paper", "chat", lambda vlm, n, clue:
             _chat(vlm, "Describe the image in few words.", f"An image of {article(n)}")),
)
TEMPLATE_NAMES = tuple(t.name for t in TEMPLATES)


def text_prompt(vlm, noun: str) -> str:
    """The model's own prompt with its image placeholder removed, answered ``a/an <noun>``
    (the ``paper`` template with its answer; used by the editing metrics' text prompts)."""
    image = getattr(vlm.processor, "image_token", "<image>")
    image = getattr(image, "content", image)
    head = vlm.prompt().replace(f"{image}\n", "").replace(image, "")
    return f"{head} {article(noun)} {noun}"


def _text_decoder(vlm) -> torch.nn.Module:
    """The language model's decoder stack (the module that owns the layers): it runs on text
    alone for every family, where the whole model may insist on pixel values."""
    for path in vlm.arch.layers:
        parent = path.rsplit(".", 1)[0]
        try:
            return A.resolve(vlm.model, parent)
        except AttributeError:
            continue
    raise AttributeError(f"{vlm.name}: no decoder found at {vlm.arch.layers}")


# --- the pure language model -------------------------------------------------------------

_PRETRAINED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _model_folder(vlm) -> Path | None:
    path = model_folder(vlm.name)
    return path if path.is_dir() else None


def merged_adapter_weights(vlm) -> dict[str, torch.Tensor]:
    """For a model whose language model is a pretrained one with low-rank adapters **merged**
    into it at load time (``smol-llava``: :func:`~mmneurons_utils.model.pretrained_lm.load_smol_llava`
    folds ``scale · B @ A`` into attention q/k/v/o), the pretrained weights of exactly the
    adapted matrices, keyed by the decoder's parameter names, on the model's device and
    dtype. Empty for a model with no such record (tiny-llava, tiny-instructblip, a hub model).
    Cached per model (~106 MB for smol-llava's 120 matrices)."""
    if vlm.model in _PRETRAINED:   # where the model is now (it may have moved since)
        params = dict(_text_decoder(vlm).named_parameters())
        return {n: t.to(params[n].device, params[n].dtype) for n, t in _PRETRAINED[vlm.model].items()}
    weights: dict[str, torch.Tensor] = {}
    folder = _model_folder(vlm)
    trained = folder / P.TRAINED_FILE if folder is not None else None
    if trained is not None and trained.is_file() and (read_marker(folder) or {}).get("language_model"):
        with safe_open(str(trained), "pt") as handle:
            adapted = sorted({k[len(P.LORA_PREFIX):-2] for k in handle.keys() if k.startswith(P.LORA_PREFIX)})
        if adapted:
            decoder = _text_decoder(vlm)
            prefix = next(name for name, module in vlm.model.named_modules() if module is decoder)
            params = dict(decoder.named_parameters())
            _, lm_state, _ = P.cached_language_model(verbose=False)
            for module in adapted:
                if not module.startswith(prefix + "."):
                    raise ValueError(f"{vlm.name}: adapter on {module}, outside the language model {prefix}")
                name = f"{module[len(prefix) + 1:]}.weight"
                weights[name] = lm_state[f"model.{name}"].to(params[name].device, params[name].dtype)
    _PRETRAINED[vlm.model] = weights
    return weights


@contextmanager
def language_model_only(vlm, pure: bool = True) -> Iterator[tuple[Callable[..., torch.Tensor], str]]:
    """``with language_model_only(vlm) as (forward, description):`` ``forward(input_ids,
    attention_mask)`` runs the decoder as the pure language model and returns the logits
    ``Float[Tensor, "B T V"]``; ``description`` says what was switched off.

    * adapters merged at load time (smol-llava): the decoder runs with the pretrained weights
      of the adapted matrices in their place (``torch.func.functional_call``), so no weight of
      the model is written;
    * adapters still injected by peft (a model being trained): each adapter layer is disabled
      for the block and re-enabled after it, also on an exception;
    * neither: the language model as loaded (for a real LLaVA the fine-tuned LM is all there is).

    ``pure=False``: the decoder as loaded, adapters and all (the previous twin's setting).
    """
    decoder = _text_decoder(vlm)
    pretrained = merged_adapter_weights(vlm) if pure else {}
    with ExitStack() as stack:
        toggled = []
        for module in decoder.modules():
            if pure and isinstance(module, BaseTunerLayer) and not module.disable_adapters:
                toggled.append(module)
        for module in toggled:
            module.enable_adapters(False)
            stack.callback(module.enable_adapters, True)
        if not pure:
            description = "language model as loaded (adapters, if any, on)"
        elif pretrained:
            description = f"pretrained language model ({len(pretrained)} merged adapter matrices replaced)"
        elif toggled:
            description = f"peft adapters disabled ({len(toggled)} layers)"
        else:
            description = "language model as loaded (no adapters found)"

        def forward(input_ids, attention_mask=None):
            kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
            hidden = (torch.func.functional_call(decoder, pretrained, (), kwargs, strict=False)
                      if pretrained else decoder(**kwargs)).last_hidden_state
            return vlm.lm_head(hidden)

        yield forward, description


# --- cloze prompts ---------------------------------------------------------------------------

@dataclass
class Cloze:
    """One prompt for one noun on the pure language model, read at its last position."""
    noun: str
    template: str
    kind: str
    form: str
    text: str
    token_id: int            # the noun's first sub-token
    probability: float       # its next-token probability
    greedy_id: int           # the arg-max next token
    scores: torch.Tensor = field(repr=False)   # Float[Tensor, "L F"] contribution to token_id
    activations: torch.Tensor | None = field(default=None, repr=False)   # Float[Tensor, "L F"] a

    @property
    def kept(self) -> bool:
        return self.greedy_id == self.token_id


@torch.no_grad()
def cloze_prompts(vlm, noun: str, templates: Sequence[str] | None = None,
                  clues: Mapping[str, str] | None = None, pure: bool = True) -> list[Cloze]:
    """Every applicable template's prompt for ``noun``, run on the pure language model
    (:func:`language_model_only`), each with the noun's probability, the greedy token and the
    contribution scores at the last position. ``[]`` when the tokenizer cannot write the noun."""
    chosen = _templates(templates)
    clue = dict(CLUES, **(clues or {})).get(noun)
    try:
        token = noun_token_id(vlm.tokenizer, noun)
    except ValueError:
        return []
    out, weights = [], unit_logit_weights(vlm, token)   # (L, F), the same for every prompt
    with language_model_only(vlm, pure) as (forward, _):
        for template in chosen:
            text = template.build(vlm, noun, clue)
            if text is None:
                continue
            enc = vlm.tokenizer(text, return_tensors="pt").to(vlm.device)
            with trace_down_proj(vlm, retain_input=True) as traces:
                logits = forward(enc["input_ids"], enc["attention_mask"])[0, -1].float()
            acts = torch.stack([traces[l].input[0, -1] for l in range(vlm.n_layers)])   # (L, F)
            probs = torch.softmax(logits, -1)
            out.append(Cloze(noun, template.name, template.kind, template.form, text, token,
                             float(probs[token]), int(probs.argmax()),
                             contribution_scores(vlm, acts, token, weights), acts.float()))
    return out


def _templates(names: Sequence[str] | None) -> list[Template]:
    if names is None:
        return list(TEMPLATES)
    unknown = [n for n in names if n not in TEMPLATE_NAMES]
    if unknown:
        raise ValueError(f"unknown template(s) {unknown}: use {', '.join(TEMPLATE_NAMES)}")
    return [t for t in TEMPLATES if t.name in names]


def _kept(prompts: list[Cloze], greedy_only: bool) -> list[Cloze]:
    return [p for p in prompts if p.kept or not greedy_only]


def text_units(vlm, noun: str, k: int, templates: Sequence[str] | None = None,
               clues: Mapping[str, str] | None = None, greedy_only: bool = True,
               pure: bool = True) -> np.ndarray:
    """``Int[ndarray, "K 2"]``: the top-``k`` units by contribution score averaged over the
    noun's kept cloze prompts (``(0, 2)`` when none is kept). ``templates=("paper",),
    greedy_only=False, pure=False`` is the previous twin (the paper's prompt with the image
    removed, whatever the model predicts there, adapters on)."""
    kept = _kept(cloze_prompts(vlm, noun, templates, clues, pure), greedy_only)
    if not kept:
        return np.zeros((0, 2), dtype=int)
    return top_units(torch.stack([p.scores for p in kept]).mean(0), k)[0]


def _share(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """``(|a ∩ b| / |a|, Jaccard)`` of two unit lists ``Int[ndarray, "K 2"]``."""
    sa, sb = set(map(tuple, a.tolist())), set(map(tuple, b.tolist()))
    shared = len(sa & sb)
    return shared / len(sa), shared / len(sa | sb)


def text_twin_overlap(vlm, ident: Identification, k: int = 10, nouns: Sequence[str] | None = None,
                      seed: int = 0, templates: Sequence[str] | None = None,
                      clues: Mapping[str, str] | None = None, greedy_only: bool = True,
                      pure: bool = True, method: str = "contribution",
                      prompts: Mapping[str, list[Cloze]] | None = None) -> pd.DataFrame:
    """One row per noun: ``retained`` (share of its image-driven top-``k`` units that are also
    its text-only top-``k``), ``jaccard``, the same two for ``k`` random units, ``other_nouns``
    (mean share retained by the other nouns' text units), ``n_images`` and ``chance`` (k/(L·F));
    and what the text side rests on: ``prompt`` (the kept prompts, a tuple), ``templates``,
    ``noun_probability`` (the noun's mean next-token probability over them, where it is the
    greedy answer), ``n_prompts_kept`` / ``n_prompts``, ``status`` (``"ok"`` or ``"no prompt
    makes the model say it"``) and ``language_model`` (what was switched off).

    Only kept prompts count: a noun without one has NaN overlap columns and is left out of the
    other nouns' baseline. ``greedy_only=False`` keeps every prompt (its ``status`` says so);
    ``templates=("paper",), greedy_only=False, pure=False`` is the previous twin.

    ``ident``: the :class:`Identification` whose units are compared (its nouns by default).
    ``method``: ``"contribution"`` or ``"noun_contrast"``: ``ident``'s units of that method,
    against text units ranked by the same score (for ``noun_contrast``, the contrast against the
    model's candidate nouns, :func:`~mmneurons_utils.method.identify.contrast_weights`).
    ``prompts``: :func:`twin_prompts` of these nouns with the same ``templates``, ``clues`` and
    ``pure``, when already run (e.g. to compare both methods on one set of forward passes)."""
    if method not in ("contribution", "noun_contrast"):
        raise ValueError(f"method must be contribution or noun_contrast, got {method!r}")
    table = ident.table
    nouns = list(nouns) if nouns is not None else sorted(table.loc[table.method == method, "noun"].unique())
    with language_model_only(vlm, pure) as (_, description):
        pass
    given = dict(prompts or {})
    prompts = {noun: given[noun] if noun in given else cloze_prompts(vlm, noun, templates, clues, pure)
               for noun in nouns}
    kept = {noun: _kept(prompts[noun], greedy_only) for noun in nouns}
    # noun_contrast: every kept prompt's activations against its noun's contrast, computed once
    contrast = contrast_weights(vlm, [p for ps in kept.values() for p in ps]) if method == "noun_contrast" else None
    score = (lambda p: p.scores) if contrast is None else (lambda p: p.activations * contrast[p.token_id])
    text = {noun: top_units(torch.stack([score(p) for p in kept[noun]]).mean(0), k)[0]
            for noun in nouns if kept[noun]}
    nan = float("nan")
    rows = []
    for i, noun in enumerate(nouns):
        image = units_of(table, noun, k, method=method)
        row = dict(noun=noun, k=k, retained=nan, jaccard=nan, random_retained=nan, random_jaccard=nan,
                   other_nouns=nan)
        if noun in text and len(image):
            retained, jaccard = _share(image, text[noun])
            rand_retained, rand_jaccard = _share(image, random_units(vlm.n_layers, vlm.d_ff, k, [seed, i]))
            others = [_share(image, text[m])[0] for m in nouns if m != noun and m in text]
            row.update(retained=retained, jaccard=jaccard, random_retained=rand_retained,
                       random_jaccard=rand_jaccard, other_nouns=float(np.mean(others)) if others else nan)
        chosen = kept[noun]
        greedy = [p.probability for p in chosen if p.kept]
        status = OK if any(p.kept for p in chosen) else SILENT
        if chosen and not greedy_only and not all(p.kept for p in chosen):
            status = f"{status}; kept anyway (greedy_only=False)" if status == OK else \
                "kept anyway (greedy_only=False): the noun is not the greedy answer"
        row.update(n_images=int(table.loc[(table.noun == noun) & (table.method == method),
                                          "image"].nunique()),
                   chance=k / (vlm.n_layers * vlm.d_ff),
                   prompt=tuple(p.text for p in chosen), templates=tuple(p.template for p in chosen),
                   noun_probability=float(np.mean(greedy)) if greedy else nan,
                   n_prompts_kept=len(chosen), n_prompts=len(prompts[noun]), status=status,
                   language_model=description)
        rows.append(row)
    return pd.DataFrame(rows)


def twin_prompts(vlm, nouns: Sequence[str], templates: Sequence[str] | None = None,
                 clues: Mapping[str, str] | None = None, pure: bool = True) -> dict[str, list[Cloze]]:
    """Noun → its :func:`cloze_prompts`, for :func:`text_twin_overlap`'s ``prompts``."""
    return {noun: cloze_prompts(vlm, noun, templates, clues, pure) for noun in nouns}
