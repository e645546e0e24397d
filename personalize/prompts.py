"""Prompt templates: one template gives the concept prompt and the superclass prompt."""

from __future__ import annotations

import re
from dataclasses import dataclass

from personalize.errors import UserError

# `<V*>` must be tried before `V*`, or "<V*>" would leave its angle brackets behind.
PLACEHOLDER = re.compile(r"\{\}|<V\*>|V\*")


@dataclass(frozen=True)
class PromptPair:
    template: str
    concept: str     # p_C: the template filled with the concept phrase ("a sks dog")
    superclass: str  # p_S: the template filled with the superclass phrase ("a dog")


def fill(template: str, phrase: str) -> str:
    """Replace every placeholder ({}, V* or <V*>) of `template` with `phrase`."""
    return PLACEHOLDER.sub(lambda _: phrase, template)


def check_template(template: str) -> str:
    if not isinstance(template, str) or not template.strip():
        raise UserError("--prompt: the prompt template is empty; write e.g. 'a photo of a {} on the beach'")
    if not PLACEHOLDER.search(template):
        raise UserError(
            f"--prompt: {template!r} has no placeholder; mark where the concept goes with {{}}, V* or <V*>"
        )
    return template


def prompt_pair(template: str, concept_phrase: str, superclass: str) -> PromptPair:
    check_template(template)
    if not concept_phrase or not concept_phrase.strip():
        raise UserError("--concept-phrase: the concept phrase is empty (e.g. 'sks dog')")
    if not superclass or not superclass.strip():
        raise UserError("--superclass: the superclass phrase is empty (e.g. 'dog')")
    return PromptPair(template, fill(template, concept_phrase), fill(template, superclass))


def remove_concept(template: str) -> str:
    """The prompt with the concept phrase removed, as the study's TS metric reads it."""
    return re.sub(r"\s+", " ", PLACEHOLDER.sub("", template)).strip()


def find_subsequence(ids: list[int], sub: list[int]) -> int:
    for start in range(len(ids) - len(sub) + 1):
        if ids[start:start + len(sub)] == sub:
            return start
    return -1


def concept_token_index(tokenizer, concept_prompt: str, concept_phrase: str) -> int:
    """Position of the concept identifier (the phrase's first token) in the tokenized prompt.

    Positions count the tokenizer's start token, so they index the text encoder's output.
    """
    ids = tokenizer(concept_prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    phrase_ids = tokenizer(concept_phrase, add_special_tokens=False).input_ids
    start = find_subsequence(list(ids), list(phrase_ids)) if phrase_ids else -1
    if start < 0:
        raise UserError(
            f"the concept phrase {concept_phrase!r} is not among the tokens of the prompt {concept_prompt!r} "
            "(within the tokenizer's length limit)"
        )
    return start
