"""The text twin: units that write a noun found with no image, on the pure language model,
from cloze prompts whose greedy answer is the noun.

The smol-llava tests (``test_smol_*``, slow) check the package against a SmolLM2 built here
from the cached pretrained weights with SmolLM2's own tokenizer (no adapters, no image) and
contribution scores written out in this file.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from mmneurons_utils import find_neurons_by_method, load_vlm, make_scenes
from mmneurons_utils.model import pretrained_lm as P
from mmneurons_utils.model.vlm import VLM
from mmneurons_utils.properties import text_twin as T
from mmneurons_utils.tiny.scenes import NOUNS

COMMON = ("dog", "cat", "car", "tree", "apple", "bird", "fish", "house", "horse", "banana", "bus", "ball")
LEVEL = 0.2            # a kept prompt must give the noun at least this probability to count here
OVERLAP_COLUMNS = ("retained", "jaccard", "random_retained", "random_jaccard")


# --- no model: the prompt set -------------------------------------------------------------

def test_every_scene_noun_has_a_riddle_that_does_not_name_it():
    assert set(T.CLUES) >= set(NOUNS)
    for noun, clue in T.CLUES.items():
        assert noun not in clue.lower().replace("?", " ").split(), noun
    for question, answer in T.SHOTS:   # the solved examples are about other nouns
        assert answer.split()[-1] not in NOUNS


def test_unknown_template_is_refused(tiny_llava):
    with pytest.raises(ValueError, match="unknown template"):
        T.cloze_prompts(tiny_llava, "dog", templates=("nope",))


# --- peft adapters still injected: disabled for the block, restored after ------------------

def _logits(vlm, text):
    ids = vlm.tokenizer(text, return_tensors="pt")["input_ids"]
    return vlm.lm_head(T._text_decoder(vlm)(input_ids=ids).last_hidden_state)[0, -1]


@torch.no_grad()
def test_injected_peft_adapters_are_off_inside_and_on_after():
    from peft import LoraConfig, inject_adapter_in_model
    from mmneurons_utils.tiny.build import build_tiny_llava

    model, processor = build_tiny_llava(seed=1)
    vlm = VLM.from_parts(model, processor, family="tiny-llava")
    text = "an image of a dog and a"
    reference = _logits(vlm, text).clone()
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"),
                            model)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.normal_(0, 0.5)
    adapted = _logits(vlm, text).clone()
    assert (adapted - reference).abs().max() > 1e-3          # the adapters change the output
    with T.language_model_only(vlm) as (forward, description):
        ids = vlm.tokenizer(text, return_tensors="pt")["input_ids"]
        assert torch.allclose(forward(ids)[0, -1], reference, atol=1e-5)
        assert "peft adapters disabled" in description
    assert torch.allclose(_logits(vlm, text), adapted, atol=1e-6)   # on again
    with pytest.raises(RuntimeError):
        with T.language_model_only(vlm):
            raise RuntimeError("inside")
    assert torch.allclose(_logits(vlm, text), adapted, atol=1e-6)   # on again after an exception


# --- the tiny models: word-level vocabularies, never language models -----------------------

@pytest.mark.parametrize("name", ["tiny-llava", "tiny-instructblip"])
def test_tiny_models_report_statuses(name, request):
    vlm = request.getfixturevalue(name.replace("-", "_"))
    ident = find_neurons_by_method(vlm, [s.image for s in make_scenes(6, seed=0)],
                                   methods=("contribution", "random"), top_k=10)
    table = ident.table
    twin = T.text_twin_overlap(vlm, ident, k=10)
    assert set(twin.noun) == set(table.loc[table.method == "contribution", "noun"])
    assert set(twin.status) <= {T.OK, T.SILENT}
    ok = twin.status == T.OK
    assert (twin.loc[ok, "n_prompts_kept"] > 0).all() and (twin.loc[~ok, "n_prompts_kept"] == 0).all()
    for column in OVERLAP_COLUMNS + ("noun_probability",):
        assert twin.loc[~ok, column].isna().all() and twin.loc[ok, column].notna().all()
    assert (twin.language_model == "language model as loaded (no adapters found)").all()
    for _, row in twin[ok].iterrows():       # a kept prompt really has the noun as greedy answer
        token = vlm.tokenizer(f"a {row.noun}", add_special_tokens=False)["input_ids"][-1]
        for prompt in row.prompt:
            assert int(_logits(vlm, prompt).argmax()) == token


# --- smol-llava: the pretrained SmolLM2 --------------------------------------------------------

@pytest.fixture(scope="module")
def smol():
    return load_vlm("smol-llava")


@pytest.fixture(scope="module")
def pure_smollm2():
    """SmolLM2-135M-Instruct as pretrained (no adapters), built here, and its own tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config_dict, state, _ = P.cached_language_model(verbose=False)
    config = LlamaConfig(**{k: v for k, v in config_dict.items()
                            if k not in ("architectures", "model_type", "transformers_version")})
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval(), P.language_model_tokenizer()


@pytest.fixture(scope="module")
def common_prompts(smol):
    return {noun: T.cloze_prompts(smol, noun) for noun in COMMON}


@torch.no_grad()
def _pure_run(model, tokenizer, text):
    """Next-token probabilities and the down_proj input at the last position, per layer."""
    acts = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda m, args, l=l: acts.__setitem__(l, args[0][0, -1].clone()))
        for l, layer in enumerate(model.model.layers)]
    try:
        logits = model(**tokenizer(text, return_tensors="pt")).logits[0, -1]
    finally:
        for hook in hooks:
            hook.remove()
    return torch.softmax(logits.float(), -1), torch.stack([acts[l] for l in range(len(acts))])


@pytest.mark.slow
def test_smol_half_the_common_nouns_are_said_with_probability_above_the_level(common_prompts):
    best = {noun: max([c.probability for c in prompts if c.kept], default=0.0)
            for noun, prompts in common_prompts.items()}
    said = [noun for noun, p in best.items() if p > LEVEL]
    assert len(said) >= len(COMMON) / 2, best
    # the previous twin (the paper's prompt, no image) is not one of them: the noun is ~never
    # its greedy answer there
    paper = [c for prompts in common_prompts.values() for c in prompts if c.template == "paper"]
    assert len(paper) == len(COMMON) and np.median([c.probability for c in paper]) < 0.01


@pytest.mark.slow
def test_smol_kept_prompts_are_the_adapter_free_models_greedy_answer(smol, common_prompts, pure_smollm2):
    model, tokenizer = pure_smollm2
    checked = 0
    for noun, prompts in common_prompts.items():
        token = tokenizer.encode(f" {noun}", add_special_tokens=False)[0]
        for cloze in prompts:
            probs, _ = _pure_run(model, tokenizer, cloze.text)
            assert cloze.token_id == token
            assert abs(cloze.probability - float(probs[token])) < 1e-4, (noun, cloze.template)
            assert cloze.kept == (int(probs.argmax()) == token), (noun, cloze.template)
            checked += cloze.kept
    assert checked >= len(COMMON)


@pytest.mark.slow
def test_smol_units_equal_a_run_with_the_adapters_removed(smol, common_prompts, pure_smollm2):
    model, tokenizer = pure_smollm2
    unembedding = model.lm_head.weight
    for noun in ("dog", "car", "banana"):
        kept = [c for c in common_prompts[noun] if c.kept]
        assert kept, noun
        token = kept[0].token_id
        scores = []
        for cloze in kept:
            _, acts = _pure_run(model, tokenizer, cloze.text)                 # (L, F)
            write = torch.stack([layer.mlp.down_proj.weight.T @ unembedding[token]
                                 for layer in model.model.layers])            # (L, F)
            scores.append(acts * write)
        flat = torch.stack(scores).mean(0).flatten()
        expected = {divmod(int(i), acts.shape[1]) for i in flat.topk(10).indices}
        got = {tuple(u) for u in T.text_units(smol, noun, 10).tolist()}
        assert got == expected, noun
        # with the adapters on (the model as loaded) the prompts read differently
        adapted = T.cloze_prompts(smol, noun, templates=[c.template for c in kept], pure=False)
        assert max(abs(a.probability - c.probability) for a, c in zip(adapted, kept)) > 1e-3


@pytest.mark.slow
def test_smol_overlap_table_and_weights_bit_identical(smol):
    before = {k: v.clone() for k, v in smol.model.state_dict().items()}
    ident = find_neurons_by_method(smol, [s.image for s in make_scenes(4, seed=0)],
                                   methods=("contribution", "random"), top_k=10)
    twin = T.text_twin_overlap(smol, ident, k=10, templates=("picture", "have", "paper"))
    after = smol.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for column in ("noun", "k", "retained", "jaccard", "random_retained", "random_jaccard", "other_nouns",
                   "n_images", "chance", "prompt", "noun_probability", "n_prompts_kept", "status"):
        assert column in twin, column
    ok = twin.status == T.OK
    assert ok.sum() >= len(twin) / 2
    assert twin.loc[ok, "retained"].notna().all() and twin.loc[~ok, "retained"].isna().all()
    assert (twin.loc[ok, "noun_probability"] > 0).all() and (twin.n_prompts_kept == twin.prompt.map(len)).all()
    assert twin.language_model.str.contains("120 merged adapter matrices replaced").all()
    # the old setting is still there: every prompt counted, adapters on
    old = T.text_twin_overlap(smol, ident, k=10, templates=("paper",), greedy_only=False, pure=False)
    assert old.retained.notna().all() and (old.n_prompts_kept == 1).all()
    assert isinstance(twin, pd.DataFrame)
