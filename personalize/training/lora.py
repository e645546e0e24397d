"""LoRA (arXiv 2106.09685) the way diffusers' `train_dreambooth_lora.py` trains it: PEFT
adapters (rank r, alpha = r, Gaussian A, zero B) on the attention projections of the
UNet and, with the text-encoder option, of the text encoder(s). Saved with diffusers'
`save_lora_weights` as `pytorch_lora_weights.safetensors`, loadable by
`pipe.load_lora_weights(folder)`."""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
FILE = "pytorch_lora_weights.safetensors"


class LoRA:
    format = "lora"
    files = (FILE,)

    def __init__(self, models, recipe, **_):
        self.models, self.recipe = models, recipe
        config = dict(r=recipe.rank, lora_alpha=recipe.rank, init_lora_weights="gaussian", lora_dropout=0.0)
        # peft's own injection (what diffusers' and transformers' add_adapter call), which
        # works with every peft version diffusers supports.
        inject_adapter_in_model(LoraConfig(target_modules=list(recipe.targets), **config), models.unet)
        self.components = ["unet"]
        if recipe.train_text_encoder:
            for name in ("text_encoder", "text_encoder_2"):
                module = getattr(models, name)
                if module is not None:
                    inject_adapter_in_model(LoraConfig(target_modules=list(TEXT_TARGETS), **config), module)
                    self.components.append(name)

    def param_groups(self) -> list[dict]:
        params = [p for name in self.components for p in getattr(self.models, name).parameters() if p.requires_grad]
        return [{"params": params, "lr": self.recipe.lr}]

    def after_step(self) -> None:
        pass

    def layers(self) -> dict[str, dict]:
        """{component: diffusers-named LoRA tensors}."""

        return {name: convert_state_dict_to_diffusers(
                    {k: v.detach().float().cpu().contiguous()
                     for k, v in get_peft_model_state_dict(getattr(self.models, name)).items()})
                for name in self.components}

    def save(self, folder: Path) -> list[str]:
        layers = self.layers()
        kwargs = {f"{name}_lora_layers": tensors for name, tensors in layers.items()}
        writer = StableDiffusionXLPipeline if self.models.family == "sdxl" else StableDiffusionPipeline
        writer.save_lora_weights(str(folder), weight_name=FILE, safe_serialization=True, **kwargs)
        return [FILE]
