"""Custom Diffusion concepts: cross-attention key/value weights and modifier tokens
(arXiv:2212.04488)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from personalize.concepts.changes import Plan, checked_pairs, swap_step
from personalize.concepts.files import CUSTOM_DIFFUSION_FILES, fail, is_embedding, read_weights, weight_files
from personalize.concepts.textual_inversion import check_embeddings, tokens_step

CD_KEY = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_[qkv]|to_out)_custom_diffusion"
                    r"(?:\.0)?\.(?P<kind>weight|bias)$")


def prepare(pipe, path: Path, *, phrase: str | None, **_) -> Plan:
    """Custom Diffusion's attention weights replace the attention projections they were
    trained for. diffusers runs them in its own attention processors; putting them into
    the projections computes the same and keeps working under the samplers that install
    their own processors (masked, Photoswap)."""
    folder = path if path.is_dir() else path.parent
    file = next((folder / n for n in CUSTOM_DIFFUSION_FILES if (folder / n).is_file()), path)
    weights, _ = read_weights(file)
    if not isinstance(weights, dict):
        raise fail(file, "expected a {name: tensor} dictionary of attention weights")
    # diffusers' .bin files list untrained attention layers with empty entries.
    weights = {k: v for k, v in weights.items() if not (isinstance(v, dict) and not v)}
    triples = [_cd_triple(pipe.unet, key, value, file) for key, value in weights.items()]
    triples += _cd_zero_biases(pipe.unet, weights)
    embeddings = _cd_tokens(folder)
    check_embeddings(pipe, folder, embeddings)
    token = " ".join(embeddings) or None
    missing = [t for t in embeddings if phrase is not None and t not in phrase.split()]
    if missing:
        raise fail(folder, f"the concept phrase {phrase!r} must contain the modifier token {missing[0]!r}")
    steps = [swap_step(checked_pairs(file, triples))]
    if embeddings:
        steps.append(tokens_step(pipe, embeddings))
    return Plan(steps, token=token)


def _cd_triple(unet, key: str, value, file: Path):
    """(key, the projection weight or bias it replaces, value)."""
    m = CD_KEY.match(key)
    if m is None or not isinstance(value, torch.Tensor):
        raise fail(file, f"{key}: not a Custom Diffusion attention weight")
    try:
        attn = unet.get_submodule(m["attn"])
    except AttributeError:
        attn = None
    if not hasattr(attn, "to_k"):
        raise fail(file, f"{key}: this model has no attention layer {m['attn']} "
                         "(a concept made for another base model?)")
    projection = attn.to_out[0] if m["proj"] == "to_out" else getattr(attn, m["proj"])
    target = getattr(projection, m["kind"])
    if target is None:
        raise fail(file, f"{key}: this model's layer has no {m['kind']}")
    return key, target, value


def _cd_zero_biases(unet, weights: dict) -> list:
    """Custom Diffusion's q/k/v projections have no bias: where the base layer has one,
    it is zeroed while the concept is applied (the processor would bypass it)."""
    triples = []
    for key in weights:
        m = CD_KEY.match(key)
        if m and m["proj"] != "to_out" and m["kind"] == "weight":
            projection = getattr(unet.get_submodule(m["attn"]), m["proj"])
            if projection.bias is not None:
                bias = projection.bias
                triples.append((key.replace(".weight", ".bias"), bias, torch.zeros_like(bias)))
    return triples


def _cd_tokens(folder: Path) -> dict[str, torch.Tensor]:
    """Modifier-token embeddings saved beside the weights (`<new1>.bin`: {"<new1>": tensor})."""
    embeddings = {}
    for file in weight_files(folder):
        if file.name in CUSTOM_DIFFUSION_FILES:
            continue
        weights, _ = read_weights(file)
        single = isinstance(weights, dict) and len(weights) == 1
        token, embedding = next(iter(weights.items())) if single else (None, None)
        if not (isinstance(token, str) and is_embedding(embedding)):
            raise fail(file, "expected a modifier-token embedding {token: tensor} "
                             "beside the Custom Diffusion weights")
        embeddings.update(weights)
    return embeddings


