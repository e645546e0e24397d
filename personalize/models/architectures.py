"""Stable Diffusion architectures with random weights, built from configs written here.

The benchmark times the denoising loop, which does not depend on what the weights are,
so it can run the real Stable Diffusion 2 base architecture (or a smaller one on a CPU)
without downloading anything:

- `mid`: SD's layout (four levels, two layers per block, cross-attention at the three
  finest levels, linear projections) at 1/5 of SD's width (a 36M-parameter UNet), 256 px,
  with a small VAE and text encoder: the denoiser dominates the time and a whole CPU
  benchmark takes minutes, not hours.
- `sd2`: stabilityai/stable-diffusion-2-base exactly (UNet 865.9M parameters, OpenCLIP
  ViT-H text encoder without its last layer, the SD VAE), for real-size GPU timings.
- `demo`: the offline demo model of `demo_model.py` (tiny; for tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from personalize.models.demo import build_pipeline as build_demo
from personalize.models.scheduler import ddim_scheduler
from personalize.models.tokenizer import CLIP_TEXT_FIELDS as CLIP_TOKENS
from personalize.models.tokenizer import clip_tokenizer

# SD's UNet layout: cross-attention at the three finest levels, none at the coarsest.
SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
SD_VAE_BLOCKS = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    unet: dict = field(default_factory=dict)
    vae: dict = field(default_factory=dict)
    text_encoder: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        """The native image side in pixels (the VAE downsamples 8x)."""
        return self.unet["sample_size"] * 8


SD2 = Architecture(
    "sd2", "Stable Diffusion 2 base architecture, random weights",
    unet={"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
          "block_out_channels": (320, 640, 1280, 1280), "down_block_types": SD_DOWN, "up_block_types": SD_UP,
          "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024, "use_linear_projection": True},
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512, "layers_per_block": 2,
         "block_out_channels": (128, 256, 512, 512), **SD_VAE_BLOCKS},
    # OpenCLIP ViT-H/14's text tower; SD2 reads the penultimate layer, so diffusers ships 23 of its 24.
    text_encoder={"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                  "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512, **CLIP_TOKENS},
)

MID = Architecture(
    "mid", "mid-size Stable Diffusion architecture (SD layout, 1/5 width, 36M-parameter UNet), random weights",
    unet={"sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
          "block_out_channels": (64, 128, 256, 256), "down_block_types": SD_DOWN, "up_block_types": SD_UP,
          "attention_head_dim": (2, 4, 8, 8), "cross_attention_dim": 512, "use_linear_projection": True},
    # A small VAE and text encoder: they run once per image, the denoiser once per row.
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 256, "layers_per_block": 1,
         "block_out_channels": (16, 32, 64, 64), "norm_num_groups": 16, **SD_VAE_BLOCKS},
    text_encoder={"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 6,
                  "num_attention_heads": 8, "hidden_act": "gelu", "projection_dim": 512, **CLIP_TOKENS},
)

DEMO = Architecture("demo", "the offline demo model (tiny), random weights", unet={"sample_size": 32})

ARCHITECTURES = {a.name: a for a in (MID, SD2, DEMO)}


def build_unet(arch: Architecture):
    return UNet2DConditionModel(**arch.unet)


def build_pipeline(arch: Architecture, *, device="cpu", dtype=torch.float32, seed: int = 0):
    """A StableDiffusionPipeline of `arch` with seeded random weights, on `device` in `dtype`.

    Modules are created directly on the device: initialising the 1.2B parameters of `sd2`
    on a GPU takes seconds, on a CPU much longer.
    """

    if arch.name == "demo":
        pipe = build_demo(seed)
    else:
        device = torch.device(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
            torch.manual_seed(seed)
            unet = build_unet(arch)
            vae = AutoencoderKL(**arch.vae)
            text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                       scheduler=ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    if dtype != torch.float32:  # weights are initialised in float32 (not every init op exists in half)
        pipe.to(dtype=dtype)
    return pipe
