"""Tiny random-weight checkpoints of every family in ``ARCHITECTURES``, built in code.

Each ``build_<family>(tmp_path) -> Path`` makes the real ``transformers`` class of
that family with a few layers and hidden sizes of 32–64, a word-level tokenizer
made with ``tokenizers`` (the prompt words plus the special tokens the family's
processor needs), the family's processor with a ``*Pil`` image processor (no
torchvision) and small images, saves both with ``save_pretrained`` and returns the
folder, so that tests go through ``load_vlm(folder)`` exactly as a user would with
a downloaded checkpoint. No network, no hub.

``IMAGE_TOKENS[family]`` is the number of image-feature positions the model
consumes for one ``IMAGE_SIZE`` × ``IMAGE_SIZE`` image (worked out by hand below).

Qwen2-VL and SmolVLM have no builder: in transformers 5.x their processors cannot
be made without torchvision (see ``architectures.UNAVAILABLE``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from mmneurons_utils.tiny.build import word_level_tokenizer

IMAGE_SIZE = 32          # side of the test images, in pixels
SEED = 0

# Every word of every family's fallback prompt template, the paper's instruction and
# answer prefix, and a few caption words; the Whitespace pre-tokenizer splits
# "[INST]" into "[", "INST", "]" and "User:" into "User", ":".
WORDS = ["USER", "ASSISTANT", "User", "Assistant", "user", "assistant", "system", "[", "]",
         "INST", "/", "[/", ":", "Describe", "the", "image", "in", "few", "words", ".", "An", "of",
         "a", "an", "and", ",", "on", "dog", "cat", "car", "tree", "red", "blue", "background"]


def make_tokenizer(specials: list[str], bos: str | None = "<s>", eos: str = "</s>",
                   pad: str = "<pad>", unk: str = "<unk>") -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :data:`WORDS`; ``specials`` are added as special tokens."""
    return word_level_tokenizer(WORDS, specials, bos=bos, eos=eos, pad=pad, unk=unk, max_length=4096)


def _llama(tokenizer, cls=None, **overrides):
    from transformers import LlamaConfig

    cls = cls or LlamaConfig
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    return cls(**kwargs)


def _clip_vision(**overrides):
    from transformers import CLIPVisionConfig

    kwargs = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
    kwargs.update(overrides)
    return CLIPVisionConfig(**kwargs)


def _finish(model, processor, tokenizer, folder: Path) -> Path:
    gc = model.generation_config
    gc.pad_token_id = tokenizer.pad_token_id
    gc.eos_token_id = tokenizer.eos_token_id
    gc.bos_token_id = tokenizer.bos_token_id
    gc.do_sample = False
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# --- LLaVA-1.5 -----------------------------------------------------------------------
def build_llava(tmp_path: Path) -> Path:
    """CLIP 32 px / patch 8 → 16 patch features (CLS dropped), Llama 2 × 64."""
    from transformers import (CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    tokenizer = make_tokenizer(["<image>"])
    config = LlavaConfig(
        vision_config=_clip_vision(), text_config=_llama(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    model = LlavaForConditionalGeneration(config)
    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size=square, crop_size=square, do_center_crop=False),
        tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    return _finish(model, processor, tokenizer, tmp_path / "llava")


# --- LLaVA-NeXT ----------------------------------------------------------------------
def build_llava_next(tmp_path: Path) -> Path:
    """Any-resolution LLaVA-NeXT: base 32 px tile plus a 32 × 64 grid for a square image."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor)

    tokenizer = make_tokenizer(["<image>"])
    pinpoints = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE],
                 [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
    config = LlavaNextConfig(
        vision_config=_clip_vision(), text_config=_llama(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return _finish(model, processor, tokenizer, tmp_path / "llava_next")


# --- InstructBLIP --------------------------------------------------------------------
NUM_QUERY_TOKENS = 8


def build_instructblip(tmp_path: Path) -> Path:
    """ViT 32 px, a 1-layer Q-Former with 8 queries (= 8 image tokens), Llama 2 × 64."""
    from transformers import (BlipImageProcessorPil, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, InstructBlipProcessor,
                              InstructBlipQFormerConfig, InstructBlipVisionConfig)

    tokenizer = make_tokenizer(["<image>"])
    qformer_tokenizer = make_tokenizer(["<image>"])
    qformer_tokenizer.padding_side = "right"
    vision = InstructBlipVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, initializer_range=0.02)
    qformer = InstructBlipQFormerConfig(
        vocab_size=len(qformer_tokenizer), hidden_size=32, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=64, encoder_hidden_size=32,
        pad_token_id=qformer_tokenizer.pad_token_id, max_position_embeddings=128)
    config = InstructBlipConfig(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
        text_config=_llama(tokenizer).to_dict(), num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(SEED)
    model = InstructBlipForConditionalGeneration(config)
    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(size=square), tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    return _finish(model, processor, tokenizer, tmp_path / "instructblip")


# --- Idefics3 ------------------------------------------------------------------------
IDEFICS_SPECIALS = (["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
                    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
IDEFICS_TILE = 16        # the vision encoder's input side (one tile)
IDEFICS_SEQ_LEN = 4      # (16 / 4)^2 patches / scale_factor^2 = 16 / 4


def build_idefics3(tmp_path: Path) -> Path:
    """Images resized to a 32 px longest edge and split into 16 px tiles: a square image
    gives 2 × 2 tiles + 1 global tile, IDEFICS_SEQ_LEN <image> tokens each."""
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessorPil, Idefics3Processor, Idefics3VisionConfig)

    tokenizer = make_tokenizer(IDEFICS_SPECIALS, bos="<|begin_of_text|>",
                               eos="<end_of_utterance>")
    vision = Idefics3VisionConfig(image_size=IDEFICS_TILE, patch_size=4, hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = Idefics3Config(
        vision_config=vision.to_dict(), text_config=_llama(tokenizer).to_dict(), scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id)  # the default, 128002, is outside the vocabulary
    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config)
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": 2 * IDEFICS_TILE}, do_image_splitting=True,
        max_image_size={"longest_edge": IDEFICS_TILE})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=IDEFICS_SEQ_LEN)
    return _finish(model, processor, tokenizer, tmp_path / "idefics3")


# --- PaliGemma -----------------------------------------------------------------------
def build_paligemma(tmp_path: Path) -> Path:
    """SigLIP 32 px / patch 8 → 16 image tokens, Gemma 2 × 64 (GeGLU)."""
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipImageProcessorPil, SiglipVisionConfig)

    tokenizer = make_tokenizer(["<image>"], bos="<bos>", eos="<eos>")
    vision = SiglipVisionConfig(image_size=IMAGE_SIZE, patch_size=8, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                vision_use_head=False)
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // 8) ** 2
    # The processor adds 1024 <locXXXX> + 128 <segXXX> tokens to the tokenizer; build
    # it first so the model's vocabulary covers them.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text = _llama(tokenizer, cls=GemmaConfig, head_dim=16, hidden_activation="gelu_pytorch_tanh",
                  tie_word_embeddings=True)
    config = PaliGemmaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vocab_size=len(tokenizer),
        projection_dim=64, hidden_size=64, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    model = PaliGemmaForConditionalGeneration(config)
    return _finish(model, processor, tokenizer, tmp_path / "paligemma")


FAMILY_BUILDERS = {
    "llava": build_llava,
    "llava_next": build_llava_next,
    "instructblip": build_instructblip,
    "idefics3": build_idefics3,
    "paligemma": build_paligemma,
}

# image-feature positions per IMAGE_SIZE × IMAGE_SIZE image
IMAGE_TOKENS = {
    "llava": (IMAGE_SIZE // 8) ** 2,                 # 4 × 4 patches, CLS dropped
    # base tile 16 + best grid 32 × 64 (4 × 8 patches) unpadded to 4 × 4 = 16, + 4 newlines
    "llava_next": 16 + 16 + 4,
    "instructblip": NUM_QUERY_TOKENS,
    "idefics3": (2 * 2 + 1) * IDEFICS_SEQ_LEN,       # 4 tiles + global image
    "paligemma": (IMAGE_SIZE // 8) ** 2,
}
