"""OpenAI CLIP's BPE tokenizer, built offline from the vocabulary open_clip ships."""

from __future__ import annotations

import functools
import gzip

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

# The special token ids of OpenAI CLIP's vocabulary (start of text, end of text, padding),
# as the text encoder configs of the demo, tiny and benchmark models need them.
CLIP_TOKEN_IDS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}
# ... and the text encoder config fields that follow from the vocabulary.
CLIP_TEXT_FIELDS = {"vocab_size": 49408, "max_position_embeddings": 77, **CLIP_TOKEN_IDS}


@functools.lru_cache(maxsize=1)
def _clip_vocabulary() -> tuple[dict, list]:
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]  # the same slice open_clip and OpenAI's CLIP take
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, [tuple(m.split()) for m in merges]


def clip_tokenizer(model_max_length: int = 77):
    """OpenAI CLIP's BPE tokenizer, built from the vocabulary open_clip ships in its package.
    A new tokenizer each call (concepts add tokens to it); the vocabulary is read once."""

    vocab, merges = _clip_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
