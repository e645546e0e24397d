"""Tiny SD-XL and PixArt-alpha pipelines with seeded random weights, built offline.

They have each family's real architecture and interface (SD-XL: two CLIP text encoders,
pooled embeddings and added time ids; PixArt-alpha: a transformer denoiser with learned
sigma and a T5 encoder with its attention mask) at a size that runs in milliseconds, for
tests and for trying the backbones where no weights can be had. Like the demo model,
the cross-attention output is scaled up so that the prompt visibly steers the sample.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from personalize.models.scheduler import ddim_scheduler
from personalize.models.tokenizer import CLIP_TEXT_FIELDS as CLIP_IDS
from personalize.models.tokenizer import clip_tokenizer

SDXL_SIZE = 128     # default image side of the tiny SD-XL (16x16 latents)
PIXART_SIZE = 128   # default image side of the tiny PixArt-alpha at sample_size 16


def tiny_vae(seed: int, sample_size: int):
    """An 8x AutoencoderKL with a few channels (four levels, like SD's)."""

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size, layers_per_block=1,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def louder_prompt(denoiser, cross_attention_names: str = "attn2", factor: float = 5.0) -> None:
    """Scale the cross-attention output projections: random weights leave the prompt a faint voice."""
    with torch.no_grad():
        for name, module in denoiser.named_modules():
            if name.endswith(cross_attention_names):
                module.to_out[0].weight.mul_(factor)


def build_sdxl_pipeline(seed: int = 0):
    """A StableDiffusionXLPipeline: UNet with "text_time" added conditioning and cross-attention
    at two levels (one with two transformer layers), CLIPTextModel + CLIPTextModelWithProjection
    (hidden sizes 32 + 32, so 64-wide cross-attention context), both with the real CLIP
    tokenizer, an 8x VAE and DDIM."""

    text_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       projection_dim=32, hidden_act="gelu", **CLIP_IDS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=SDXL_SIZE // 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16,
        )
        louder_prompt(unet)
        with torch.no_grad():
            unet.conv_out.weight.mul_(3.0)
        vae = tiny_vae(seed + 1, SDXL_SIZE)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    tokenizer = clip_tokenizer()
    return StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(),
                                     text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer, tokenizer_2=tokenizer,
                                     unet=unet.eval(), scheduler=ddim_scheduler())


def t5_like_tokenizer():
    """A word-level tokenizer with T5's conventions (<pad> 0, </s> 1, <unk> 2, an end token and
    no start token), over the whole words of CLIP's vocabulary; backed by `tokenizers`."""

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for token in clip_tokenizer().get_vocab():
        word = token.removesuffix("</w>")
        if token.endswith("</w>") and word.isalpha():
            vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=512)


def build_pixart_pipeline(seed: int = 0, sample_size: int = PIXART_SIZE // 8):
    """A PixArtAlphaPipeline: a 2-block PixArt transformer (patch 2, learned sigma: 8 output
    channels), a 2-layer T5 encoder over `t5_like_tokenizer`, an 8x VAE and DDIM.

    `sample_size=128` (the latent side of PixArt-alpha 1024) turns on the resolution and
    aspect-ratio conditioning, as in the real 1024 model; run it at small sizes anyway.
    """

    tokenizer = t5_like_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = PixArtTransformer2DModel(
            num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=48, caption_channels=32, sample_size=sample_size, patch_size=2,
        )
        louder_prompt(transformer)
        vae = tiny_vae(seed + 1, sample_size * 8)
        torch.manual_seed(seed + 2)
        text_encoder = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
    # eval(): T5 has dropout, and a model built from a config starts in training mode
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                               transformer=transformer.eval(), scheduler=ddim_scheduler())
