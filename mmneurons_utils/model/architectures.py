"""Each supported model family, described as data.

An :class:`Architecture` says where things are inside a ``transformers`` model:
the decoder layers of the language model, each layer's FFN output projection
(``down_proj``: its *input* is the neuron activation ``a[l, :]``, its weight
columns are the write vectors ``W_out[l][:, i]``), the final norm and the
unembedding ``lm_head``, and which config field holds the image-token id.
Paths are dotted attribute names; the first that resolves wins, so one entry can
cover several ``transformers`` layouts of the same family.

Adding a family is adding an entry to :data:`ARCHITECTURES` (and a tiny
random-weight config in ``tests/tiny_configs.py``); nothing else branches on the
model type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class UnsupportedModelError(ValueError):
    """The checkpoint's model type has no entry in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class Architecture:
    family: str
    model_types: tuple[str, ...]           # config.model_type values it covers
    model_class: str                       # transformers class that loads it
    layers: tuple[str, ...]                # candidate paths of the decoder ModuleList
    final_norm: tuple[str, ...]            # candidate paths of the norm before lm_head
    lm_head: tuple[str, ...] = ("lm_head", "language_model.lm_head")
    down_proj: str = "mlp.down_proj"       # inside one decoder layer
    act_fn: str = "mlp.act_fn"             # the gate nonlinearity (for activation="act_fn")
    image_token_fields: tuple[str, ...] = ("image_token_id", "image_token_index")
    # Used when the processor has no chat template: {image} is the processor's image
    # placeholder (omitted where the processor inserts the image tokens itself).
    prompt_template: str = "{instruction}"
    gated_ffn: bool = True                 # down_proj(act(gate(x)) * up(x))
    # the module whose output is the image features the language model reads (one row
    # per image token): region invariance permutes its output along the token axis
    image_projector: tuple[str, ...] = ("model.multi_modal_projector", "multi_modal_projector")
    # True when the image tokens are one square, row-major grid of patches (heatmaps
    # over the image are defined); False for query tokens, tiles or packed layouts
    patch_grid: bool = False
    notes: str = ""
    extra: dict = field(default_factory=dict)


_LM_LAYERS = ("model.language_model.layers", "language_model.model.layers",
              "model.text_model.layers", "language_model.layers", "model.layers")
_LM_NORM = ("model.language_model.norm", "language_model.model.norm",
            "model.text_model.norm", "language_model.norm", "model.norm")

ARCHITECTURES: dict[str, Architecture] = {a.family: a for a in [
    Architecture(
        family="llava", model_types=("llava",), model_class="LlavaForConditionalGeneration",
        layers=_LM_LAYERS, final_norm=_LM_NORM,
        prompt_template="USER: {image}\n{instruction} ASSISTANT:", patch_grid=True,
        notes="LLaVA-1.5 (llava-hf/llava-1.5-*-hf) and the embedded tiny-llava"),
    Architecture(
        family="llava_next", model_types=("llava_next",),
        model_class="LlavaNextForConditionalGeneration",
        layers=_LM_LAYERS, final_norm=_LM_NORM,
        prompt_template="[INST] {image}\n{instruction} [/INST]",
        notes="LLaVA-NeXT / LLaVA-1.6 (llava-hf/llava-v1.6-*-hf); any-resolution tiling"),
    Architecture(
        family="instructblip", model_types=("instructblip",),
        model_class="InstructBlipForConditionalGeneration",
        layers=_LM_LAYERS, final_norm=_LM_NORM,
        prompt_template="{instruction}",  # the processor prepends the query tokens
        image_projector=("language_projection", "model.language_projection"),
        notes="InstructBLIP with a decoder-only LM (Vicuna); the image tokens are the "
              "Q-Former's query outputs, not a patch grid. Flan-T5 variants are not supported."),
    Architecture(
        family="idefics3", model_types=("idefics3",),
        model_class="Idefics3ForConditionalGeneration",
        layers=_LM_LAYERS, final_norm=_LM_NORM,
        # the processor expands {image} into <fake_token_around_image>, a <row_i_col_j> or
        # <global-img> tag and image_seq_len <image> tokens per tile (+ the global image)
        prompt_template="User:{image}{instruction}<end_of_utterance>\nAssistant:",
        image_projector=("model.connector", "connector"),
        notes="Idefics3 (HuggingFaceM4/Idefics3-8B-Llama3); image splitting into tiles, "
              "pixel-shuffle connector. SmolVLM is not covered (see UNAVAILABLE)."),
    Architecture(
        family="paligemma", model_types=("paligemma",),
        model_class="PaliGemmaForConditionalGeneration",
        layers=_LM_LAYERS, final_norm=_LM_NORM,
        # The processor inserts <bos> after the image tokens and appends "\n" (the
        # prefix/answer separator) after the whole text, so the answer prefix of
        # VLM.prompt() ends up inside the bidirectional prefix, before the "\n".
        prompt_template="{image}{instruction}", patch_grid=True,
        notes="PaliGemma (Gemma decoder, GeGLU FFN); the image tokens and the prompt are a "
              "prefix with bidirectional attention (token_type_ids == 0)"),
]}

# Model types that are known but cannot be loaded here, and why (named in the error).
_NEEDS_TORCHVISION = ("its transformers 5.x processor holds a video processor that exists only "
                      "with torchvision, and AutoProcessor builds it even for images; the "
                      "project does not depend on torchvision")
UNAVAILABLE: dict[str, str] = {
    "qwen2_vl": _NEEDS_TORCHVISION,
    "qwen2_5_vl": _NEEDS_TORCHVISION,
    "smolvlm": _NEEDS_TORCHVISION,
}

EMBEDDED_FAMILY = {"tiny-llava": "llava", "tiny-instructblip": "instructblip", "smol-llava": "llava"}


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHITECTURES.values() for t in a.model_types)


def architecture_for(model_type: str) -> Architecture:
    """The entry that covers ``config.model_type``; a clear error if none does."""
    for arch in ARCHITECTURES.values():
        if model_type in arch.model_types:
            return arch
    why = f" ({UNAVAILABLE[model_type]})" if model_type in UNAVAILABLE else ""
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported{why}; supported model types: "
        f"{', '.join(supported_model_types())}")


def resolve(root: torch.nn.Module, paths: tuple[str, ...] | str):
    """The first dotted attribute path of ``paths`` that exists under ``root``."""
    for path in (paths,) if isinstance(paths, str) else paths:
        obj = root
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise AttributeError(f"{type(root).__name__} has none of {paths}")
