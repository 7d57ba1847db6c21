"""Every family in ``ARCHITECTURES`` works through ``load_vlm(folder)``.

Each family's tiny random-weight checkpoint (``tests/tiny_configs.py``) is built once
per module, saved, and loaded back the way a user loads a downloaded checkpoint.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from mmneurons_utils.model import architectures as A
from mmneurons_utils.model.vlm import ANSWER_PREFIX, Caption, ModelLoadError, load_vlm

from tiny_configs import FAMILY_BUILDERS, IMAGE_SIZE, IMAGE_TOKENS

# transformers 5.24's PaliGemmaProcessor calls np.array on a list of tensors
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _images(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for _ in range(n)]


@pytest.fixture(scope="module", params=sorted(FAMILY_BUILDERS))
def family_vlm(request, tmp_path_factory):
    family = request.param
    folder = FAMILY_BUILDERS[family](tmp_path_factory.mktemp(family))
    return family, load_vlm(folder)


def _text_config(vlm):
    return vlm.model.config.get_text_config()


def _decoder(vlm) -> torch.nn.Module:
    """The language model whose ``layers`` are ``vlm.layers`` (it receives ``inputs_embeds``)."""
    return next(m for m in vlm.model.modules() if getattr(m, "layers", None) is vlm.layers)


def test_every_family_has_a_tiny_checkpoint():
    assert set(FAMILY_BUILDERS) == set(A.ARCHITECTURES)
    assert set(IMAGE_TOKENS) == set(A.ARCHITECTURES)


def test_family_and_class(family_vlm):
    family, vlm = family_vlm
    assert vlm.arch.family == family
    assert type(vlm.model).__name__ == vlm.arch.model_class
    assert not vlm.embedded


def test_prompt(family_vlm):
    _, vlm = family_vlm
    prompt = vlm.prompt()
    assert prompt.endswith(ANSWER_PREFIX)
    assert "Describe the image in few words." in prompt
    assert "{" not in prompt
    if "{image}" in vlm.arch.prompt_template:
        assert getattr(vlm.processor.image_token, "content", vlm.processor.image_token) in prompt


def test_describe_one_image(family_vlm):
    _, vlm = family_vlm
    captions = vlm.describe(_images(1), max_new_tokens=4, nouns=[])
    assert len(captions) == 1
    caption = captions[0]
    assert isinstance(caption, Caption)
    assert len(caption.token_ids) <= 4
    assert len(caption.tokens) == len(caption.token_ids)
    assert isinstance(caption.text, str)


def test_describe_batch_of_two(family_vlm):
    _, vlm = family_vlm
    images = _images(2, seed=1)
    captions = vlm.describe(images, max_new_tokens=4, nouns=[], batch_size=2)
    assert len(captions) == 2 and all(len(c.token_ids) <= 4 for c in captions)
    # the batched forward gives each row the logits it gets alone
    with torch.no_grad():
        batch = vlm.model(**vlm.inputs(images)).logits[:, -1]
        for row, image in enumerate(images):
            alone = vlm.model(**vlm.inputs([image])).logits[0, -1]
            torch.testing.assert_close(batch[row], alone, atol=1e-4, rtol=1e-4)


def test_image_token_mask_counts_consumed_features(family_vlm):
    family, vlm = family_vlm
    enc = vlm.inputs(_images(2, seed=2))
    mask = vlm.image_token_mask(enc["input_ids"])
    assert mask.shape == enc["input_ids"].shape
    assert mask.sum(1).tolist() == [IMAGE_TOKENS[family]] * 2
    spans = vlm.image_token_span(enc["input_ids"])
    assert all(end > start for start, end in spans)

    # The positions whose input embedding the model replaced by image features are
    # exactly the masked ones: what the mask counts is what the model consumes.
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].detach().clone()

    handle = _decoder(vlm).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            vlm.model(**enc)
    finally:
        handle.remove()
    with torch.no_grad():
        text_embeds = vlm.model.get_input_embeddings()(enc["input_ids"])
    replaced = ~torch.isclose(seen["embeds"], text_embeds, atol=1e-6).all(-1)
    assert torch.equal(replaced, mask)


def test_neuron_locations(family_vlm):
    _, vlm = family_vlm
    text = _text_config(vlm)
    assert vlm.n_layers == text.num_hidden_layers
    for layer in range(vlm.n_layers):
        down = vlm.down_proj(layer)
        assert isinstance(down, torch.nn.Linear)
        assert down.weight.shape == (text.hidden_size, text.intermediate_size)
    assert vlm.d_ff == text.intermediate_size
    assert isinstance(vlm.lm_head, torch.nn.Linear)
    assert vlm.lm_head.weight.shape == (text.vocab_size, text.hidden_size)
    assert text.vocab_size >= len(vlm.tokenizer)


def test_final_norm_and_lm_head_make_the_logits(family_vlm):
    _, vlm = family_vlm
    seen = {}
    handle = vlm.final_norm.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    try:
        with torch.no_grad():
            logits = vlm.model(**vlm.inputs(_images(1, seed=3))).logits
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(vlm.lm_head(seen["h"]), logits, atol=1e-5, rtol=1e-5)


def test_down_proj_pre_hook_fires_during_describe(family_vlm):
    _, vlm = family_vlm
    calls = [0] * vlm.n_layers
    widths = set()

    def hook(layer):
        def fire(module, args):
            calls[layer] += 1
            widths.add(args[0].shape[-1])
        return fire

    handles = [vlm.down_proj(l).register_forward_pre_hook(hook(l)) for l in range(vlm.n_layers)]
    try:
        vlm.describe(_images(1, seed=4), max_new_tokens=2, nouns=[])
    finally:
        for h in handles:
            h.remove()
    assert all(c >= 1 for c in calls), calls
    assert widths == {vlm.d_ff}


def test_image_projector_feeds_the_image_tokens(family_vlm):
    """Region invariance permutes this module's output rows: it must be what the LLM reads."""
    from mmneurons_utils.properties.specificity import patch_grid

    family, vlm = family_vlm
    A.resolve(vlm.model, vlm.arch.image_projector)
    rows = vlm.image_projector_rows
    ids = vlm.inputs(_images(1))["input_ids"]
    consumed = int(vlm.image_token_mask(ids).sum())
    if family in ("llava", "instructblip", "paligemma"):  # one row per image token
        assert rows == consumed
    else:                                                 # tiles / packing add rows or tags
        assert rows >= 1
    grid = patch_grid(vlm)
    assert (grid is not None) == vlm.arch.patch_grid
    if grid:
        assert grid[0] * grid[1] == consumed


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(A.UnsupportedModelError) as info:
        load_vlm(tmp_path)
    message = str(info.value)
    assert "'bert'" in message
    for model_type in A.supported_model_types():
        assert model_type in message


@pytest.mark.parametrize("model_type", sorted(A.UNAVAILABLE))
def test_unavailable_model_type_says_why(tmp_path, model_type):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(A.UnsupportedModelError, match="torchvision"):
        load_vlm(tmp_path)


def test_folder_without_config_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_vlm(tmp_path)


# A chat template with llava-hf/llava-1.5's conventions ("USER: <image>\n... ASSISTANT:").
LLAVA_15_STYLE_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def test_chat_template_wins_and_matches_the_llava_fallback(tmp_path):
    vlm = load_vlm(FAMILY_BUILDERS["llava"](tmp_path))
    fallback = vlm.prompt()
    vlm.processor.chat_template = LLAVA_15_STYLE_TEMPLATE
    assert vlm.prompt() == fallback == (
        "USER: <image>\nDescribe the image in few words. ASSISTANT: An image of")


# --- teacher forcing reproduces generation, for every family ---------------------------
@contextmanager
def _forced_length(vlm, n: int):
    """Random weights stop or emit pad / image tokens early: make generate give ``n`` tokens."""
    # InstructBLIP's generate runs its language model's generate, with that one's config
    configs = [m.generation_config for m in vlm.model.modules()
               if getattr(m, "generation_config", None) is not None]
    saved = [(gc.min_new_tokens, gc.suppress_tokens) for gc in configs]
    for gc in configs:
        gc.min_new_tokens = n
        gc.suppress_tokens = [vlm.tokenizer.pad_token_id, vlm.image_token_id]
    try:
        yield
    finally:
        for gc, (low, suppress) in zip(configs, saved):
            gc.min_new_tokens, gc.suppress_tokens = low, suppress


def test_teacher_forcing_reproduces_generation(family_vlm):
    """``append_captions`` extends every per-position input (PaliGemma: drops ``labels``,
    marks the caption causal in ``token_type_ids``), so a teacher-forced forward reads the
    activations and logits that generation produced."""
    from mmneurons_utils.model.teacher_forcing import teacher_forced_activations, teacher_forced_logits

    _, vlm = family_vlm
    images, n = _images(2, seed=5), 4
    with _forced_length(vlm, n):
        caps = vlm.describe(images, max_new_tokens=n, nouns=[], batch_size=2,
                            activation="down_proj_input")
        with torch.no_grad():
            out = vlm.model.generate(**vlm.inputs(images), max_new_tokens=n, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
    generated = torch.stack(out.logits, 1).float()                      # (batch, n, V), raw
    assert all(len(c.token_ids) == n for c in caps)
    forced_logits = teacher_forced_logits(vlm, images, [c.token_ids for c in caps])
    for row, (image, cap) in enumerate(zip(images, caps)):
        forced = teacher_forced_activations(vlm, vlm.inputs([image]), cap.token_ids, list(range(n)))
        torch.testing.assert_close(forced, cap.activations.steps, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(forced_logits[row], generated[row], atol=1e-4, rtol=1e-4)


def test_gradient_scores_run(family_vlm):
    from mmneurons_utils.method.scoring import gradient_attributions

    _, vlm = family_vlm
    image, n = _images(1, seed=6)[0], 3
    with _forced_length(vlm, n):
        cap = vlm.describe([image], max_new_tokens=n, nouns=[])[0]
    scores = gradient_attributions(vlm, vlm.inputs([image]), cap.token_ids,
                                   [(step, cap.token_ids[step]) for step in range(n)], ("noun",))["noun"]
    assert len(scores) == n
    for s in scores:
        assert s.shape == (vlm.n_layers, vlm.d_ff) and torch.isfinite(s).all() and s.abs().sum() > 0


# --- batches of prompts of different lengths ------------------------------------------------
SIZES = [(IMAGE_SIZE, IMAGE_SIZE), (2 * IMAGE_SIZE, IMAGE_SIZE), (IMAGE_SIZE, 2 * IMAGE_SIZE)]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_one_at_a_time(family_vlm, padding_side):
    """Images of other sizes give llava_next and idefics3 prompts of other lengths: the batch
    is left-padded whatever the tokenizer's padding side, so each row's caption and recorded
    activations (steps and image tokens) are those it gets alone."""
    family, vlm = family_vlm
    rng = np.random.default_rng(8)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    lengths = [vlm.inputs([image])["input_ids"].shape[1] for image in images]
    if family in ("llava_next", "idefics3"):
        assert len(set(lengths)) > 1, lengths
    saved, n = vlm.tokenizer.padding_side, 4
    vlm.tokenizer.padding_side = padding_side
    try:
        with _forced_length(vlm, n):
            batch = vlm.describe(images, max_new_tokens=n, nouns=[], batch_size=len(images),
                                 activation="down_proj_input", image_activations=True)
            alone = [vlm.describe([image], max_new_tokens=n, nouns=[], activation="down_proj_input",
                                  image_activations=True)[0] for image in images]
    finally:
        vlm.tokenizer.padding_side = saved
    assert vlm.tokenizer.padding_side == saved
    for b, a in zip(batch, alone):
        assert b.token_ids == a.token_ids
        torch.testing.assert_close(b.activations.steps, a.activations.steps, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b.activations.image, a.activations.image, atol=1e-4, rtol=1e-4)


def test_activation_ablation_hits_each_images_own_noun_position(family_vlm, monkeypatch):
    """``causal_curves(level="activation")`` zeroes the units at the position producing the
    noun in *that* image's sequence (llava_next / idefics3 prompt lengths differ by image)."""
    from mmneurons_utils import causal
    from mmneurons_utils.method.identify import find_neurons_by_method

    _, vlm = family_vlm
    rng = np.random.default_rng(9)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    monkeypatch.setattr(vlm, "nouns_of", lambda text: [w for w in text.split() if w.isalpha()][:2])
    seen = []
    real = causal.RowPerturbation

    def spy(units, mode="zero", **kwargs):
        seen.append(list(kwargs["positions"]))
        return real(units, mode, **kwargs)

    monkeypatch.setattr(causal, "RowPerturbation", spy)
    with _forced_length(vlm, 4):
        ident = find_neurons_by_method(vlm, images, methods=("random",), top_k=1, max_new_tokens=4)
        curves = causal.causal_curves(vlm, ident, images, ks=(1,), methods=("random",), n_random=1,
                                      level="activation", max_new_tokens=4)
    assert len(curves) and len(seen) == len(curves)
    expected = [[vlm.inputs([images[r.image]])["input_ids"].shape[1] - 1 + r.step]
                for r in curves.itertuples()]
    assert seen == expected


def test_captions_never_contain_placeholder_tokens(family_vlm):
    """Even when the unembedding favours them, the image placeholders (Idefics3: also
    ``<fake_token_around_image>`` and ``<global-img>``) are never generated."""
    _, vlm = family_vlm
    ids = vlm.placeholder_token_ids
    assert vlm.image_token_id in ids

    def favour(module, args, out):
        out = out.clone()
        out[..., ids] += 1e4
        return out

    handle = vlm.lm_head.register_forward_hook(favour)
    try:
        captions = vlm.describe(_images(2, seed=10), max_new_tokens=4, nouns=[])
    finally:
        handle.remove()
    assert all(not set(ids) & set(c.token_ids) for c in captions)
