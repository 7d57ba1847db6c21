"""Configs, tokenizer and processors of the embedded CPU models.

Both models are the real ``transformers`` classes with tiny configs:

* ``tiny-llava``: ``LlavaForConditionalGeneration`` — CLIP ViT (64 × 64 px, patch 8,
  so 64 image tokens + CLS), 2-layer MLP projector, Llama decoder (4 layers,
  d_model 192, SwiGLU d_ff 768).
* ``tiny-instructblip``: ``InstructBlipForConditionalGeneration`` — the same ViT,
  a 2-layer Q-Former with 16 query tokens, the same Llama decoder.

The tokenizer is word-level over the prompt and caption grammar (≈ 80 tokens), so
every noun is exactly one token.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BlipImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipProcessor,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .scenes import BACKGROUNDS, IMAGE_SIZE, NOUNS

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
PROMPT_WORDS = ["USER", ":", "Describe", "the", "image", "in", "few", "words", ".",
                "ASSISTANT", "An", "of"]
GRAMMAR_WORDS = ["a", "an", "and", ",", "on", "background"]
PATCH = 8
NUM_QUERY_TOKENS = 16


def vocabulary() -> list[str]:
    words = SPECIALS + PROMPT_WORDS + GRAMMAR_WORDS + list(BACKGROUNDS) + list(NOUNS)
    assert len(set(words)) == len(words), "vocabulary words must be unique"
    return words


def word_level_tokenizer(words, specials=("<image>",), bos: str | None = "<s>", eos: str = "</s>",
                         pad: str = "<pad>", unk: str = "<unk>",
                         max_length: int = 512) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: whitespace/punctuation split, ``bos`` prepended, left padding.

    Ids: pad, bos, eos, unk, then ``specials``, then ``words`` (duplicates dropped).
    """
    base = [t for t in (pad, bos, eos, unk) if t is not None]
    specials = list(dict.fromkeys(base + list(specials)))
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + list(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, "a , b" → "a, b"
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])])
    # `<image>` is a special AddedToken of the tokenizers object, not a v5 attribute
    # (InstructBlipProcessor breaks on the attribute; see shared/notes/tiny-models.md).
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=eos, unk_token=unk, pad_token=pad, padding_side="left",
        model_max_length=max_length, **({"bos_token": bos} if bos is not None else {}))


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded models' tokenizer: every noun of the scenes is one token."""
    return word_level_tokenizer(vocabulary()[len(SPECIALS):], specials=SPECIALS[4:])


def _image_processor_kwargs() -> dict:
    return dict(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False,
                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _vision_config(cls=CLIPVisionConfig):
    return cls(image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=128, intermediate_size=512,
               num_hidden_layers=3, num_attention_heads=4, initializer_range=0.02)


def _text_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=768,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)


def build_tiny_llava(seed: int = 0):
    """A freshly initialised tiny LLaVA and its processor."""
    tokenizer = make_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=_vision_config(), text_config=_text_config(tokenizer),
        image_token_index=image_token_id, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**_image_processor_kwargs()), tokenizer=tokenizer,
        patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    _set_generation_defaults(model, tokenizer)
    return model, processor


def build_tiny_instructblip(seed: int = 0):
    """A freshly initialised tiny InstructBLIP and its processor."""
    tokenizer = make_tokenizer()
    qformer_tokenizer = make_tokenizer()
    qformer_tokenizer.padding_side = "right"
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = InstructBlipConfig(
        vision_config=_vision_config(InstructBlipVisionConfig).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qformer_tokenizer), hidden_size=128, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=512, encoder_hidden_size=128,
            pad_token_id=qformer_tokenizer.pad_token_id, max_position_embeddings=128).to_dict(),
        text_config=_text_config(tokenizer).to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS, image_token_index=image_token_id)
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    with torch.no_grad():  # HF initialises the queries at zero; they must differ to learn
        model.query_tokens.normal_(0.0, 0.02)
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(**_image_processor_kwargs()), tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    _set_generation_defaults(model, tokenizer)
    return model, processor


def _set_generation_defaults(model, tokenizer) -> None:
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.do_sample = False
    gc.max_new_tokens = 16


BUILDERS = {"tiny-llava": build_tiny_llava, "tiny-instructblip": build_tiny_instructblip}
