import pytest

from personalize.models.tokenizer import clip_tokenizer
from personalize.errors import UserError
from personalize.prompts import concept_token_index, prompt_pair, remove_concept


@pytest.mark.parametrize("template", ["a {} in the snow", "a V* in the snow", "a <V*> in the snow"])
def test_placeholders(template):
    p = prompt_pair(template, "sks dog", "dog")
    assert (p.concept, p.superclass) == ("a sks dog in the snow", "a dog in the snow")


@pytest.mark.parametrize("template", ["a dog in the snow", "", "   "])
def test_no_placeholder_is_an_error(template):
    with pytest.raises(UserError, match="--prompt"):
        prompt_pair(template, "sks dog", "dog")


def test_remove_concept():
    assert remove_concept("a {} in the jungle") == "a in the jungle"


def test_clip_tokenizer_is_openai_clip():
    tok = clip_tokenizer()
    # ids of OpenAI CLIP's vocabulary: <start>, a, photo, of, a, sks, dog, <end>
    assert tok("a photo of a sks dog").input_ids == [49406, 320, 1125, 539, 320, 48136, 1929, 49407]
    assert tok.model_max_length == 77


def test_concept_token_index():
    tok = clip_tokenizer()
    assert concept_token_index(tok, "a photo of a sks dog on the beach", "sks dog") == 5
    assert concept_token_index(tok, "sks dog", "sks dog") == 1
    with pytest.raises(UserError, match="not among the tokens"):
        concept_token_index(tok, "a photo of a dog", "sks dog")
