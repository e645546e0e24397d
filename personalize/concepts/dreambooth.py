"""DreamBooth concepts: fine-tuned `unet/` and/or `text_encoder/` weights (arXiv:2208.12242)."""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.concepts.changes import Plan, checked_pairs, model_key, swap_step
from personalize.concepts.files import fail, module_folders, read_tensors

DREAMBOOTH_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                      "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                      "diffusion_pytorch_model.bin", "pytorch_model.bin")
IGNORED_STATE = (".position_ids",)  # buffers older transformers saved and newer ones recompute


def prepare(pipe, path: Path, **_) -> Plan:
    """Fine-tuned `unet/` and/or `text_encoder/` weights replace the pipeline's (the VAE
    is not fine-tuned by DreamBooth and stays)."""
    names = module_folders(path)
    if not names:
        raise fail(path, "a DreamBooth concept needs unet/ or text_encoder/ with config.json and weights")
    triples = []
    for name in names:
        file = _module_weights(path / name)
        weights, _ = read_tensors(file)
        triples += _state_triples(getattr(pipe, name), weights, file)
    return Plan([swap_step(checked_pairs(path, triples))])


def _module_weights(folder: Path) -> Path:
    for name in DREAMBOOTH_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise fail(folder, "sharded weights are not supported; save the module as one file")
    raise fail(folder, f"no weights file (expected one of {', '.join(DREAMBOOTH_WEIGHTS)})")


def _state_triples(model, weights: dict[str, torch.Tensor], file: Path) -> list:
    """(key, target, new) for a whole module's state dict: every weight must be there."""
    target = model.state_dict(keep_vars=True)
    renamed = {model_key(model, k): v for k, v in weights.items() if not k.endswith(IGNORED_STATE)}
    unexpected = sorted(set(renamed) - set(target))
    missing = sorted(set(target) - set(renamed))
    if unexpected or missing:
        detail = "; ".join(f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("unexpected keys", unexpected), ("missing keys", missing)) if keys)
        raise fail(file, f"does not match this model's {type(model).__name__} ({detail}); "
                         "a module made for another base model?")
    return [(key, target[key], value) for key, value in renamed.items()]


