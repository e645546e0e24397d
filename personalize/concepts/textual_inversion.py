"""Textual-inversion concepts: a new token's embedding (arXiv:2208.01618)."""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.concepts.changes import Plan, Step, Undo
from personalize.concepts.files import TI_FILES, fail, is_embedding, read_weights, weight_files


def prepare(pipe, path: Path, *, phrase: str | None, **_) -> Plan:
    file = named_or_single(path, TI_FILES)
    file_token, embedding = _ti_embedding(file)
    token = phrase or file_token
    if not token:
        raise fail(file, "the embedding does not name its token; give the concept phrase (--concept-phrase)")
    embeddings = {token: embedding}
    check_embeddings(pipe, file, embeddings)
    return Plan([tokens_step(pipe, embeddings)], token=token)


def named_or_single(path: Path, names: tuple[str, ...]) -> Path:
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    return weight_files(path)[0]  # detect_format found exactly one


def _ti_embedding(file: Path) -> tuple[str | None, torch.Tensor]:
    """(token in the file, embedding) from diffusers' {token: tensor}, A1111's
    {"string_to_param": {"*": tensor}, "name": ...} / {"emb_params": tensor}, or a bare tensor."""
    weights, _ = read_weights(file)
    token, embedding = None, weights
    if isinstance(weights, dict) and "string_to_param" in weights:
        params = weights["string_to_param"]
        embedding = params.get("*") if isinstance(params, dict) else None
        token = weights.get("name") if isinstance(weights.get("name"), str) else None
    elif isinstance(weights, dict) and len(weights) == 1:
        (token, embedding), = weights.items()
        token = None if token == "emb_params" or not isinstance(token, str) else token
    if not is_embedding(embedding):
        raise fail(file, "expected a textual-inversion embedding: "
                         "{token: tensor of shape (dim,) or (vectors, dim)}")
    return token, embedding


def check_embeddings(pipe, file: Path, embeddings: dict[str, torch.Tensor]) -> None:
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    vocab = pipe.tokenizer.get_vocab()
    for token, embedding in embeddings.items():
        if embedding.shape[-1] != dim:
            raise fail(file, f"the embedding for {token!r} has size {embedding.shape[-1]}, but this model's "
                             f"text encoder has {dim} (a concept made for another base model?)")
        if not torch.isfinite(embedding).all():
            raise fail(file, f"the embedding for {token!r} holds NaN or infinite values")
        taken = [t for t in _vector_tokens(token, embedding) if t in vocab]
        if taken:
            raise fail(file, f"the token {taken[0]!r} is already in the tokenizer; choose another concept phrase")


def _vector_tokens(token: str, embedding: torch.Tensor) -> list[str]:
    """The tokens diffusers adds for an embedding (one per vector)."""
    n = embedding.shape[0] if embedding.ndim == 2 else 1
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def tokens_step(pipe, embeddings: dict[str, torch.Tensor]) -> Step:
    """Add tokens with diffusers' `load_textual_inversion`; undo unloads them and puts
    back the original embedding matrix and vocabulary size."""
    def apply() -> Undo:
        encoder = pipe.text_encoder
        module = encoder.get_input_embeddings()
        saved = (module.weight.data, module.num_embeddings, encoder.config.vocab_size)
        before = set(pipe.tokenizer.added_tokens_encoder)

        def undo() -> None:
            added = [t for t in pipe.tokenizer.added_tokens_encoder if t not in before]
            if added:
                pipe.unload_textual_inversion(added)
            # unload_textual_inversion builds a new embedding module and leaves the config's
            # vocab_size grown; restore the originals themselves.
            encoder.set_input_embeddings(module)
            module.weight.data, module.num_embeddings, encoder.config.vocab_size = saved

        try:
            for token, embedding in embeddings.items():
                pipe.load_textual_inversion(embedding, token=token)
        except BaseException:
            undo()
            raise
        return undo
    return apply


