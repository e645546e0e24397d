"""The offline demo: a small Stable-Diffusion-architecture pipeline with seeded random
weights and the real CLIP tokenizer, so everything runs where no weights can be had."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from personalize.models.scheduler import ddim_scheduler
from personalize.models.tokenizer import CLIP_TEXT_FIELDS, clip_tokenizer
from personalize.prompts import prompt_pair
from personalize.sampling.engine import run
from personalize.sampling.samplers import configure

DEMO_CONCEPT = {"phrase": "sks dog", "superclass": "dog"}
DEMO_SIZE = 256       # default image size of the demo model (32x32 latents)
REFERENCE_PROMPT = "a photo of a {}"


def build_pipeline(seed: int = 0):
    """The demo pipeline in memory: UNet with cross-attention at two resolutions and the middle block, an
    8x VAE, a 2-layer CLIP text encoder, DDIM as in the study."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=DEMO_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 64),
            # Like SD's, the full-resolution level has no attention (it would dominate the time).
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
        )
        # Default init leaves the prompt a faint voice and the noise prediction small; scale
        # both up so that, like a trained model, eps has about unit spread and the prompt
        # visibly steers the sample.
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("attn2"):
                    module.to_out[0].weight.mul_(5.0)
            unet.conv_out.weight.mul_(3.0)
            unet.conv_out.bias.mul_(3.0)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=DEMO_SIZE, layers_per_block=1,
            block_out_channels=(8, 16, 32, 32), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, projection_dim=64, **CLIP_TEXT_FIELDS,
        ))
    scheduler = ddim_scheduler()
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_demo_model(out: str | Path, *, references: int = 3, steps: int = 10) -> Path:
    """Write the demo pipeline to `out` (diffusers layout) with `concept.json` and
    reference images sampled from the demo concept itself."""

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        from personalize.errors import UserError
        raise UserError(f"demo-model: {out} exists and is not empty; choose a new folder")
    pipe = build_pipeline()
    pipe.save_pretrained(out)
    ref_dir = out / "references"
    ref_dir.mkdir()
    prompts = prompt_pair(REFERENCE_PROMPT, DEMO_CONCEPT["phrase"], DEMO_CONCEPT["superclass"])
    paths = []
    for k in range(references):
        result = run(pipe, prompts, configure("concept", {}, steps), seed=1000 + k)
        path = ref_dir / f"reference_{k}.png"
        result.images[0].save(path)
        paths.append(str(path.relative_to(out)))
    # `random_weights` lets the app say plainly that this is the offline demo model.
    concept = dict(DEMO_CONCEPT, references=paths, random_weights=True)
    (out / "concept.json").write_text(json.dumps(concept, indent=2) + "\n")
    return out


def default_demo_path() -> Path:
    root = os.environ.get("PERSONALIZE_CACHE") or Path.home() / ".cache" / "personalize"
    return Path(root) / "demo-model"


def ensure_demo_model() -> Path:
    """The demo model folder used when no --model is given, written on first use."""
    path = default_demo_path()
    if not (path / "concept.json").is_file():
        import shutil
        import tempfile
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".demo-model.", dir=path.parent))
        try:
            write_demo_model(tmp / "model")
            if path.exists():
                shutil.rmtree(path)
            (tmp / "model").rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
