"""SVDiff (arXiv 2303.11305): train shifts of the singular values of every weight.

Each Linear, Conv, GroupNorm/LayerNorm and Embedding weight W of the UNet and the text
encoder gets a trainable vector delta (one entry per singular value; a norm weight is a
1 x C row, so one scalar). The weight used in the forward pass is, in residual form,

    W' = W + U diag(relu(S + scale * delta) - S) Vh,        U, S, Vh = svd(W)

which equals the paper's U diag(relu(S + delta)) Vh (S >= 0) but leaves W bitwise
unchanged when delta = 0. Conv kernels are matrices (out, in * kh * kw), as in
svdiff-pytorch. The files are svdiff-pytorch's: `spectral_shifts.safetensors` (UNet) and
`spectral_shifts_te.safetensors` (text encoder, keys with the `text_model.` prefix).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from ..concepts.svdiff import spectral_shift

SHIFTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
UNET_FILE = "spectral_shifts.safetensors"
TEXT_FILE = "spectral_shifts_te.safetensors"


def _svd(weight: torch.Tensor):
    w = weight.detach().float()
    matrix = w.reshape(1, -1) if w.ndim == 1 else w.reshape(w.shape[0], -1)
    return torch.linalg.svd(matrix, full_matrices=False)


class SpectralShift(nn.Module):
    """A parametrization of a weight: its SVD (frozen buffers) and the trainable `delta`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        u, s, vh = _svd(weight)
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("s", s, persistent=False)
        self.register_buffer("vh", vh, persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(s))
        self.scale = 1.0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return spectral_shift(weight, self.u, self.s, self.vh, self.delta, self.scale)


class EmbeddingShift(SpectralShift):
    """The shift of an embedding table, applied to the looked-up rows only: row i of W' is
    W[i] + U[i] diag(relu(S + delta) - S) Vh, so a step costs (tokens x d x d), not a
    whole (vocabulary x d x d) weight (52 GFLOP a step for SD-2's text encoder)."""

    def hook(self, module, args, output):
        rows = (self.u[args[0]] * (F.relu(self.s + self.scale * self.delta) - self.s)) @ self.vh
        return output + rows.to(output.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The whole shifted table (for saving and checks; training uses `hook`)."""
        return spectral_shift(weight, self.u, self.s, self.vh, self.delta, self.scale)


def shifted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module SVDiff shifts: those of `SHIFTED` that have a weight."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, SHIFTED) and isinstance(getattr(m, "weight", None), torch.Tensor)]


def add_shifts(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parametrize every shifted weight of `model` in place; {module path: delta}."""
    deltas = {}
    for name, module in shifted_modules(model):
        if isinstance(module, nn.Embedding):
            shift = EmbeddingShift(module.weight).to(module.weight.device)
            module.add_module("spectral_shift", shift)
            module.register_forward_hook(shift.hook)
        else:
            shift = SpectralShift(module.weight).to(module.weight.device)
            parametrize.register_parametrization(module, "weight", shift)
        deltas[name] = shift.delta
    return deltas


def shift_of(module: nn.Module) -> SpectralShift:
    """The shift `add_shifts` put on a module."""
    if isinstance(getattr(module, "spectral_shift", None), EmbeddingShift):
        return module.spectral_shift
    return module.parametrizations.weight[0]


def shifted_weight(module: nn.Module) -> torch.Tensor:
    """The weight a shifted module computes with."""
    if isinstance(getattr(module, "spectral_shift", None), EmbeddingShift):
        return module.spectral_shift(module.weight)
    return module.weight


def file_key(model: nn.Module, name: str, text_encoder: bool) -> str:
    """svdiff-pytorch's key of a module's delta: the module path + `.delta`; text-encoder
    paths carry transformers 4's `text_model.` prefix (transformers 5 flattened it)."""
    if text_encoder and not hasattr(model, "text_model") and not name.startswith("text_model."):
        name = f"text_model.{name}"
    return f"{name}.delta"


def is_one_d(name: str) -> bool:
    """The study trains the shifts of normalisation layers (names with "norm") at lr_1d."""
    return "norm" in name


class SVDiff:
    """The method object the loop drives: shifts on the copies of UNet and text encoder."""

    format = "svdiff"
    files = (UNET_FILE, TEXT_FILE)

    def __init__(self, models, recipe, **_):
        self.models = models
        self.unet_deltas = add_shifts(models.unet)
        self.text_deltas = add_shifts(models.text_encoder) if recipe.train_text_encoder else {}
        self.recipe = recipe

    def param_groups(self) -> list[dict]:
        deltas = [*self.unet_deltas.items(), *self.text_deltas.items()]
        main = [d for name, d in deltas if not is_one_d(name)]
        one_d = [d for name, d in deltas if is_one_d(name)]
        lr_1d = self.recipe.lr if self.recipe.lr_1d is None else self.recipe.lr_1d
        return [{"params": main, "lr": self.recipe.lr}, {"params": one_d, "lr": lr_1d}]

    def after_step(self) -> None:
        pass

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """{file name: {key: delta}} as written."""
        files = {UNET_FILE: {file_key(self.models.unet, n, False): d.detach().float().cpu().contiguous()
                             for n, d in self.unet_deltas.items()}}
        if self.text_deltas:
            files[TEXT_FILE] = {file_key(self.models.text_encoder, n, True): d.detach().float().cpu().contiguous()
                                for n, d in self.text_deltas.items()}
        return files

    def save(self, folder: Path) -> list[str]:
        written = []
        for name, tensors in self.tensors().items():
            save_file(tensors, str(folder / name))
            written.append(name)
        return written
