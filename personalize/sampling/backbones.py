"""One small adapter per diffusers pipeline family, for the loop in `engine.py`.

An adapter only translates a family's interface: the denoiser module (where attention
hooks go), one prompt's conditioning, one denoiser call over a batch of rows, the size
rules, the initial noise and decoding. It uses the pipeline's own helpers
(`encode_prompt`, `_get_add_time_ids`, `prepare_latents`), so that concept sampling is
diffusers' own pipeline for every family.

- SD 1.x / 2.x (`StableDiffusionPipeline`): UNet, CLIP text embeddings.
- SD-XL (`StableDiffusionXLPipeline`): UNet; two CLIP encoders' embeddings, the pooled
  embedding and the added time ids.
- PixArt-alpha (`PixArtAlphaPipeline`): transformer; T5 embeddings with their attention
  mask, the resolution conditioning of the 1024 model, and learned sigma dropped.

A conditioning is a dict of denoiser keyword arguments whose tensors have a batch of one
row (nested dicts and None allowed); `batch_conditioning` stacks them for a call.
"""

from __future__ import annotations

import torch
from diffusers import PixArtAlphaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

from personalize.errors import UserError
from personalize.prompts import concept_token_index

Conditioning = dict


class Backbone:
    """SD 1.x / 2.x; the base of the other families."""

    family = "sd"
    title = "Stable Diffusion 1.x/2.x"

    def __init__(self, pipe):
        self.pipe = pipe
        self.runner = None  # the denoiser's stand-in for this run (runtime.denoiser_runner), or None

    # -- what the loop reads ---------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def sample_size(self) -> int:
        """The denoiser's native latent side."""
        return self.denoiser.config.sample_size

    @property
    def size_multiple(self) -> int:
        """Image sides must be positive multiples of this."""
        return self.pipe.vae_scale_factor

    def default_size(self) -> tuple[int, int]:
        side = self.sample_size * self.pipe.vae_scale_factor
        return side, side

    def check_size(self, height: int, width: int) -> None:
        for name, v in (("--height", height), ("--width", width)):
            if v <= 0 or v % self.size_multiple:
                raise UserError(f"{name}: {v} must be a positive multiple of {self.size_multiple}")

    def token_index(self, prompt: str, phrase: str) -> int:
        """Position of the concept identifier in the text encoder's output for `prompt`."""
        return concept_token_index(self.tokenizer, prompt, phrase)

    # -- phases ----------------------------------------------------------------------------
    def encode(self, text: str, *, negative: bool, size: tuple[int, int]) -> Conditioning:
        """One prompt's conditioning (`negative`: it is the unconditional branch)."""
        embeds, _ = self.pipe.encode_prompt(text, self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def __call__(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        """The noise prediction for a batch (rows of `x` match rows of `cond`)."""
        if self.runner is not None:
            return self.runner(x, t, cond["encoder_hidden_states"])
        return self.denoiser(x, t, **cond, return_dict=False)[0]

    def prepare_latents(self, num_images: int, height: int, width: int, dtype, generator) -> torch.Tensor:
        return self.pipe.prepare_latents(num_images, self.denoiser.config.in_channels, height, width, dtype,
                                         self.device, generator)

    def step_output(self, steps: int) -> int:
        """Which element of `scheduler.step(..., return_dict=False)` is the next latent."""
        return 0

    def decode(self, latents: torch.Tensor, generator) -> list:
        pipe = self.pipe
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])


class SDXLBackbone(Backbone):
    """SD-XL: the UNet reads both encoders' penultimate states (concatenated), the second
    encoder's pooled projection, and the time ids (original size, crop (0, 0), target size)."""

    family = "sdxl"
    title = "Stable Diffusion XL"

    @property
    def tokenizer(self):
        return self.pipe.tokenizer if self.pipe.tokenizer is not None else self.pipe.tokenizer_2

    @property
    def sample_size(self) -> int:
        return self.pipe.default_sample_size

    def encode(self, text: str, *, negative: bool, size: tuple[int, int]) -> Conditioning:
        pipe = self.pipe
        embeds, _, pooled, _ = pipe.encode_prompt(text, device=self.device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if negative and not text and pipe.config.force_zeros_for_empty_prompt:
            # diffusers' SD-XL pipeline without a negative prompt: zero embeddings
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        projection_dim = (int(pooled.shape[-1]) if pipe.text_encoder_2 is None
                          else pipe.text_encoder_2.config.projection_dim)
        time_ids = pipe._get_add_time_ids(tuple(size), (0, 0), tuple(size), dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection_dim)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(self.device)}}

    def decode(self, latents: torch.Tensor, generator) -> list:
        """As diffusers' pipeline: float16 VAEs marked `force_upcast` decode in float32, and
        latents are de-normalised with the VAE's latents mean and std when it has them."""
        pipe, vae = self.pipe, self.pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            latents = latents.to(vae.dtype)
            mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                channels = latents.shape[1]
                mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")


class PixArtBackbone(Backbone):
    """PixArt-alpha: the transformer reads T5 states with their padding mask; the 1024 model
    (latent side 128) also reads the resolution and aspect ratio. Prompts are lower-cased as
    the pipeline does; its caption cleaning is not used (it would strip tokens like
    `<cat-toy>`), nor its resolution binning (images have the size asked for)."""

    family = "pixart"
    title = "PixArt-alpha"
    max_sequence_length = 120  # diffusers' default for PixArt-alpha

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.denoiser.config.patch_size

    def token_index(self, prompt: str, phrase: str) -> int:
        prompt, phrase = self.pipe._text_preprocessing([prompt, phrase], clean_caption=False)
        index = concept_token_index(self.tokenizer, prompt, phrase)
        if index >= self.max_sequence_length:
            raise UserError(f"the concept phrase {phrase!r} starts at token {index} of the prompt, past the "
                            f"{self.max_sequence_length} tokens the text encoder reads")
        return index

    def encode(self, text: str, *, negative: bool, size: tuple[int, int]) -> Conditioning:
        embeds, mask, _, _ = self.pipe.encode_prompt(text, do_classifier_free_guidance=False,
                                                     num_images_per_prompt=1, device=self.device,
                                                     clean_caption=False,
                                                     max_sequence_length=self.max_sequence_length)
        mask = mask.to(maybe_adjust_dtype_for_device(mask.dtype, mask.device))
        added = {"resolution": None, "aspect_ratio": None}
        if self.sample_size == 128:  # as diffusers decides it
            height, width = size
            added = {"resolution": torch.tensor([[height, width]], dtype=embeds.dtype, device=self.device),
                     "aspect_ratio": torch.tensor([[float(height / width)]], dtype=embeds.dtype, device=self.device)}
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "added_cond_kwargs": added}

    def __call__(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        timestep = torch.as_tensor(t, device=x.device)
        timestep = (timestep[None] if timestep.ndim == 0 else timestep).expand(x.shape[0])
        out = self.denoiser(x, timestep=timestep, **cond, return_dict=False)[0]
        if self.denoiser.config.out_channels // 2 == x.shape[1]:
            out = out.chunk(2, dim=1)[0]  # learned sigma: keep the noise prediction
        return out

    def step_output(self, steps: int) -> int:
        # diffusers' PixArt pipeline takes the predicted clean sample when it runs one step
        return 1 if steps == 1 else 0

    def decode(self, latents: torch.Tensor, generator) -> list:
        pipe = self.pipe
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")


def families() -> list[tuple[type, type[Backbone]]]:
    return [(StableDiffusionXLPipeline, SDXLBackbone), (PixArtAlphaPipeline, PixArtBackbone),
            (StableDiffusionPipeline, Backbone)]


SUPPORTED = "StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline, PixArtAlphaPipeline"


def backbone(pipe) -> Backbone:
    """The adapter for `pipe`'s family; a clear error for any other pipeline."""
    for pipeline_class, adapter in families():
        if isinstance(pipe, pipeline_class):
            return adapter(pipe)
    raise UserError(f"{type(pipe).__name__} is not a supported pipeline; supported: {SUPPORTED}")


def default_size(pipe) -> tuple[int, int]:
    """(height, width) a run of `pipe` uses when none is given."""
    return backbone(pipe).default_size()


def batch_conditioning(conds: list[Conditioning], rows: int) -> Conditioning:
    """Stack one-row conditionings, each repeated `rows` times, along the batch."""
    first = conds[0]
    out = {}
    for key, value in first.items():
        if value is None:
            out[key] = None
        elif isinstance(value, dict):
            out[key] = batch_conditioning([c[key] for c in conds], rows)
        else:
            out[key] = torch.cat([c[key].expand(rows, *c[key].shape[1:]) for c in conds])
    return out
