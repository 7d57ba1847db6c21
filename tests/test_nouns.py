from mmneurons_utils.model.nouns import locate_nouns, vocabulary_nouns
from mmneurons_utils.tiny.scenes import NOUNS, caption_scores
from mmneurons_utils.tiny.scenes import make_scenes
from mmneurons_utils.tiny.build import make_tokenizer


def test_vocabulary_nouns_in_order_without_repeats():
    assert vocabulary_nouns("a boat and a boat, a dog on a blue background", NOUNS) == ["boat", "dog"]


def test_locate_nouns_gives_the_step_of_the_first_occurrence():
    tok = make_tokenizer()
    ids = tok(" a dog and a cat and a dog", add_special_tokens=False).input_ids
    found = {n.noun: n for n in locate_nouns(tok, ids, ["dog", "cat", "cow"])}
    assert set(found) == {"dog", "cat"}  # cow is not said
    assert tok.convert_ids_to_tokens(ids[found["dog"].step]) == "dog" and found["dog"].step == 1
    assert found["cat"].step == 4 and found["cat"].token_id == tok.convert_tokens_to_ids("cat")


class _SubwordTokenizer:
    """Splits 'elephant' into 'ele' + 'phant' to check first-sub-token handling."""
    pieces = {0: "an", 1: " ele", 2: "phant", 3: " and", 4: " a", 5: " cat"}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids).strip()


def test_multi_token_noun_maps_to_its_first_sub_token():
    found = locate_nouns(_SubwordTokenizer(), [0, 1, 2, 3, 4, 5], ["elephant", "cat"])
    assert [(n.noun, n.step, n.token_id) for n in found] == [("elephant", 1, 1), ("cat", 5, 5)]


def test_caption_scores_on_known_cases():
    scenes = make_scenes(2, seed=0)
    perfect = caption_scores([s.caption for s in scenes], scenes)
    assert perfect["noun_recall"] == perfect["noun_precision"] == perfect["exact_match"] == 1.0
    empty = caption_scores(["nothing here", "nothing"], scenes)
    assert empty["noun_recall"] == 0.0 and empty["exact_match"] == 0.0


def test_without_spacy_the_error_says_how_to_get_nouns(monkeypatch):
    import sys

    import pytest

    from mmneurons_utils.model.nouns import NounTaggerMissing, tagged_nouns

    monkeypatch.setitem(sys.modules, "spacy", None)  # makes `import spacy` fail
    with pytest.raises(NounTaggerMissing, match=r"pip install spacy.*nouns=\[\.\.\.\]"):
        tagged_nouns("a dog on a mat")


def test_real_models_without_a_tagger_warn_once_and_accept_nouns(monkeypatch):
    import sys
    import warnings

    from mmneurons_utils.tiny.build import build_tiny_llava
    from mmneurons_utils.model.vlm import VLM

    monkeypatch.setitem(sys.modules, "spacy", None)
    model, processor = build_tiny_llava(seed=0)
    vlm = VLM.from_parts(model, processor, family="llava")  # a "real" model: no scene vocabulary
    assert not vlm.embedded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert vlm.nouns_of("a dog") == [] and vlm.nouns_of("a cat") == []
    assert len(caught) == 1 and "spacy" in str(caught[0].message)
    ids = processor.tokenizer(" a dog and a cat", add_special_tokens=False).input_ids
    caption = vlm._caption(ids, nouns=["cat"])
    assert caption.nouns == ["cat"] and caption.noun_tokens[0].step == 4
