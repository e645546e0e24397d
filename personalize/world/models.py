"""The world's networks: sizes chosen so that everything trains on a 2-core CPU within
the hour and ships in a few megabytes.

Each builder is seeded by the caller and returns a fresh, untrained module. The
autoencoder maps 64x64 RGB to a 16x16x8 latent (a factor of 4, where Stable Diffusion
uses 8; eight channels, where SD uses four, because a 4x4 patch that holds an edge needs
two colours and the edge's place, and four numbers learned that too slowly for a CPU
hour: after 10 minutes a four-channel codec still turned black-and-white stripes green),
the denoiser is a Stable-Diffusion-style UNet with cross-attention at 16x16 and
8x8 so that attention masks and attention swaps act as they do on SD, and the text
encoder is a small CLIP text transformer over the real CLIP tokenizer, shaped like the
metric model's text tower so that a build can start it from that tower.
"""

from __future__ import annotations

import open_clip
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..models.tokenizer import CLIP_TOKEN_IDS

IMAGE_SIZE = 64
LATENT_SIZE = 16
LATENT_CHANNELS = 8
TEXT_WIDTH = 64

# One home for the noise schedule the world trains and samples with. Not Stable
# Diffusion's scaled-linear one: at 16x16 its last timestep keeps sqrt(alpha_bar) = 0.07
# of the latent, so a background's mean colour survives the noise (averaged over 256
# latent pixels its SNR is about 1) and the denoiser learns to read the background from
# the noise instead of from the prompt; sampling from pure noise then draws backgrounds
# at random (arXiv:2305.08891). DDPM's linear schedule keeps 0.006 and, with trailing
# spacing, sampling starts at t = 999. There an epsilon prediction says next to nothing
# about the image (x0 = (z - sqrt(1 - a) eps) / sqrt(a) multiplies its error by 150), so
# the denoiser predicts v (arXiv:2202.00512), as Stable Diffusion 2 at 768 px does.
NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                      beta_schedule="linear", prediction_type="v_prediction")

# open_clip model config of the metric model: a small ResNet (CLIP's ModifiedResNet; a ViT
# of the same cost, over 8x8 patches, told the four shapes apart on 77% of renders only
# after its 8 minutes), and a text tower over the real CLIP vocabulary.
METRIC_MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 4, "layers": 3},
    "quick_gelu": False,
}


def autoencoder():
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, sample_size=IMAGE_SIZE, layers_per_block=1,
        block_out_channels=(16, 32, 64), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=False,
    )


def denoiser():
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                # diffusers reads `attention_head_dim` of this class as the number of heads: heads of 32 channels.
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=(1, 2, 2), norm_num_groups=16,
    )


def text_encoder():
    """A CLIP text transformer shaped like the metric model's text tower, so that tower's
    weights load into it (`text_encoder_from_metric`)."""
    text = METRIC_MODEL_CONFIG["text_cfg"]
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=text["vocab_size"], hidden_size=text["width"], intermediate_size=4 * text["width"],
        num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
        max_position_embeddings=text["context_length"], projection_dim=text["width"],
        hidden_act="quick_gelu" if METRIC_MODEL_CONFIG["quick_gelu"] else "gelu",
        **CLIP_TOKEN_IDS,
    ))


def text_encoder_from_metric(clip) -> CLIPTextModel:
    """The metric model's text tower as a transformers `CLIPTextModel` (the layout
    diffusers pipelines hold): its hidden states are the tower's, before the pooling and
    projection that only the contrastive loss uses. Stable Diffusion conditions on a
    contrastively trained text encoder in the same way (arXiv:2112.10752, section 4.3)."""
    state = clip.state_dict()
    layers = METRIC_MODEL_CONFIG["text_cfg"]["layers"]
    weights = {"embeddings.token_embedding.weight": state["token_embedding.weight"],
               "embeddings.position_embedding.weight": state["positional_embedding"],
               "final_layer_norm.weight": state["ln_final.weight"], "final_layer_norm.bias": state["ln_final.bias"]}
    for i in range(layers):
        theirs, ours = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2"), ("attn.out_proj", "self_attn.out_proj")):
            for kind in ("weight", "bias"):
                weights[f"{ours}{b}.{kind}"] = state[f"{theirs}{a}.{kind}"]
        for kind in ("weight", "bias"):   # open_clip keeps q, k and v as one matrix
            for part, name in zip(state[f"{theirs}attn.in_proj_{kind}"].chunk(3), "qkv"):
                weights[f"{ours}self_attn.{name}_proj.{kind}"] = part
    encoder = text_encoder()
    encoder.load_state_dict({k: v.float() for k, v in weights.items()})
    return encoder


def metric_model():
    return open_clip.CLIP(**{k: v for k, v in METRIC_MODEL_CONFIG.items()})


def ddim_scheduler():
    return DDIMScheduler(**NOISE_SCHEDULE, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")


def ddpm_scheduler():
    return DDPMScheduler(**NOISE_SCHEDULE, clip_sample=False)
