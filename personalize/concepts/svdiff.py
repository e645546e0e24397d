"""SVDiff concepts: shifts of the singular values of the base weights (arXiv:2303.11305)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from personalize.concepts.changes import Plan, check_shape, checked_pairs, model_key, swap_step
from personalize.concepts.files import SVDIFF_FILES, fail, read_tensors


def spectral_weight(weight: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """SVDiff's weight (Han et al. 2023, arXiv 2303.11305): U diag(relu(S + scale * delta)) V^T
    from the SVD of the base weight W, computed in the residual form
    W + U diag(relu(S + scale * delta) - S) V^T, which is the same matrix but leaves W
    bitwise unchanged where delta is zero. As in svdiff-pytorch, a conv kernel is a matrix
    (out, in * kh * kw), and a 1-D weight (norms) is one row (1, C)."""
    w = weight.detach().float()
    matrix = w.reshape(1, -1) if w.ndim == 1 else w.reshape(w.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return spectral_shift(weight, u, s, vh, delta.to(device=s.device, dtype=s.dtype), scale)


def spectral_shift(weight: torch.Tensor, u, s, vh, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """W + U diag(relu(S + scale * delta) - S) Vh, reshaped like W, given W's SVD."""
    shift = (u * (F.relu(s + scale * delta) - s)) @ vh
    return weight + shift.reshape(weight.shape).to(weight.dtype)


def spectral_size(weight: torch.Tensor) -> int:
    """The number of singular values (length of delta) of a weight."""
    return 1 if weight.ndim == 1 else min(weight.shape[0], weight[0].numel())


def prepare(pipe, path: Path, *, scale: float, **_) -> Plan:
    files = [path] if path.is_file() else [path / n for n in SVDIFF_FILES if (path / n).is_file()]
    triples = []
    for file in files:
        if file.name not in SVDIFF_FILES:
            raise fail(file, f"an SVDiff file must be named one of {', '.join(SVDIFF_FILES)} "
                             "(the name says whether it shifts the UNet or the text encoder)")
        model = getattr(pipe, SVDIFF_FILES[file.name])
        deltas, _ = read_tensors(file)
        if not deltas:
            raise fail(file, "holds no spectral shifts")
        for key, delta in deltas.items():
            target = _svdiff_target(model, key, file)
            check_shape(file, key, delta.shape, (spectral_size(target),))
            triples.append((key, target, spectral_weight(target, delta, scale)))
    return Plan([swap_step(checked_pairs(path, triples))])


def _svdiff_target(model, key: str, file: Path) -> torch.nn.Parameter:
    """The weight a delta key shifts. svdiff-pytorch writes `<module>.delta` (the module's
    weight); the study writes `<module>.<attr>.delta`, and torch's parametrize names the
    same `<module>.parametrizations.<attr>.0.delta`."""
    if not key.endswith(".delta"):
        raise fail(file, f"{key}: expected SVDiff keys ending in .delta")
    name = re.sub(r"\.parametrizations\.(\w+)\.0$", r".\1", key[:-len(".delta")])
    name = model_key(model, name)
    module, _, attr = name.rpartition(".")
    param = _parameter(model, name, "weight")
    if param is None and module:
        param = _parameter(model, module, attr)
    if param is None:
        raise fail(file, f"{key}: this model's {type(model).__name__} has no such weight "
                         "(a concept made for another base model?)")
    return param


def _parameter(model, module_name: str, attr: str) -> torch.nn.Parameter | None:
    try:
        return model.get_submodule(module_name)._parameters.get(attr)
    except AttributeError:
        return None


