"""DreamBooth (arXiv 2208.12242) as the study trains it: the attention q/k/v projections
of the UNet and (by default) the text encoder(s) are fine-tuned directly, everything else
frozen. Saved as a UNet / text-encoder pair of diffusers folders (`unet/`,
`text_encoder/`, `text_encoder_2/` on SD-XL), which `--concept` loads into the base model."""

from __future__ import annotations

from pathlib import Path

import torch


def select(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, torch.nn.Parameter]:
    """Every parameter whose name contains one of `targets` (weights and biases)."""
    return {name: p for name, p in model.named_parameters() if any(t in name for t in targets)}


class DreamBooth:
    format = "dreambooth"
    files = ("unet", "text_encoder", "text_encoder_2")
    saves_in_checkpoints = False   # full modules: checkpoints keep only the trained tensors

    def __init__(self, models, recipe, **_):
        self.models, self.recipe = models, recipe
        self.trained = {"unet": select(models.unet, recipe.targets)}
        if recipe.train_text_encoder:
            for name in ("text_encoder", "text_encoder_2"):
                module = getattr(models, name)
                if module is not None:
                    self.trained[name] = select(module, recipe.targets)
        for params in self.trained.values():
            for p in params.values():
                p.requires_grad_(True)

    def param_groups(self) -> list[dict]:
        return [{"params": list(params.values()), "lr": self.recipe.lr} for params in self.trained.values()]

    def after_step(self) -> None:
        pass

    def save(self, folder: Path) -> list[str]:
        written = []
        for name in self.trained:
            getattr(self.models, name).save_pretrained(folder / name, safe_serialization=True)
            written.append(name)
        return written
