"""`personalize world build`: render the world's data, then train its autoencoder, text
encoder and denoiser, its metric model and its two personal concepts, and write them as
one folder that diffusers, the metrics code and the concept loader read as they are.

Parts are trained in order and each is saved as soon as it is done; `resume=True` loads
the parts an interrupted build already finished instead of training them again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionPipeline
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms.functional import gaussian_blur

from ..errors import UserError
from ..models.tokenizer import clip_tokenizer
from ..training import train_concept
from . import models
from .scene import (
    CLASSES,
    COLOURS,
    CONCEPTS,
    CONTEXTS,
    codec_batch,
    named_instance_batch,
    object_mask,
    random_caption,
    random_scene,
    reference_scenes,
    render,
    render_batch,
)

PIPELINE_PARTS = ("vae", "text_encoder", "unet", "tokenizer", "scheduler")
STATE_FILE = "build-state.json"
LATENTS_FILE = "world-latents.pt"   # in the build's .work folder, removed when the build ends


@dataclass(frozen=True)
class BuildSize:
    """How much data and how many optimiser steps each part gets."""
    images: int = 40_000             # renders behind the autoencoder and the denoiser
    vae_steps: int = 2_000
    vae_batch: int = 16
    vae_minutes: float = 12.0        # wall-clock caps: a build fits its hour on a slower machine too
    denoiser_steps: int = 8_000
    denoiser_batch: int = 32         # in a fixed time, more small steps beat fewer large ones
    denoiser_minutes: float = 35.0
    metric_steps: int = 900
    metric_batch: int = 128
    metric_minutes: float = 5.0
    concept_steps: int = 600
    concept_lr: float = 5e-3         # SVDiff at 5x the study's rate: at 1x, 600 steps left no visible concept
    concept_class_images: int = 40
    concept_batch: int = 1           # SVDiff's batch (the study's is 1)
    concept_by_name: tuple = ()      # (name, steps, lr, batch) rows: one concept's own settings in place of the three above
    decoder_steps: int = 1_000
    decoder_minutes: float = 4.0
    decoder_detail_blur: float = 3.0  # the decoder stage blurs detail channels by up to this sigma (0: never)
    latent_anchor: float = 0.5       # weight pulling latent channels 0-2 to the image's 4x4 averages (0: none)
    instances: int = 64              # named instances taught after the denoiser (0: no such stage)
    instance_share: float = 0.3      # their share of that stage's training pairs
    instance_steps: int = 3_000
    instance_minutes: float = 10.0
    object_weight: float = 3.0       # denoiser loss weight of the object's latent pixels (1: none)
    timesteps: str = "snr-normal"    # how denoiser timesteps are drawn: "uniform" | "snr-normal"
    text_encoder: str = "metric"     # the denoiser's text encoder starts as: "metric" (the metric model's
                                     # text tower) | "joint" (random); either way it trains with the denoiser
    class_anchor: bool = True        # with latent_anchor: a latent channel also holds the object's class code
    code_steps: int = 0              # with class_anchor: the encoder alone then learns the class code (0: no such stage)
    code_batch: int = 32
    code_minutes: float = 3.0
    decoder_picture_blur: float = 0.0  # the decoder stage also blurs the anchored picture by up to this sigma (0: never)
    decoder_denoised: int = 0        # world renders the decoder stage also sees as the denoiser redraws them
    decoder_denoised_share: float = 0.5  # their share of the decoder stage's batches
    continue_minutes: float = 0.0    # after the named instances, the denoiser trains on, on world pairs alone (0: no such stage)
    continue_steps: int = 10_000

    def __post_init__(self):
        # Checked here, not when the stage that reads them comes, up to 90 minutes into a build.
        if self.timesteps not in ("uniform", "snr-normal"):
            raise ValueError(f"timesteps must be 'uniform' or 'snr-normal', got {self.timesteps!r}")
        if self.text_encoder not in ("metric", "joint"):
            raise ValueError(f"text_encoder must be 'metric' or 'joint', got {self.text_encoder!r}")
        for row in self.concept_by_name:
            if len(row) != 4 or row[0] not in CONCEPTS:
                raise ValueError(f"concept_by_name: {row!r} is not a (name, steps, lr, batch) row for one of "
                                 f"the world's concepts {sorted(CONCEPTS)}")
        names = [row[0] for row in self.concept_by_name]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"concept_by_name: {', '.join(map(repr, twice))} has more than one row")

    def concept_settings(self, name: str) -> tuple[int, float, int]:
        """(steps, lr, batch) of concept `name`: its own row, or the recipe's shared settings."""
        own = {row[0]: tuple(row[1:]) for row in self.concept_by_name}
        return own.get(name, (self.concept_steps, self.concept_lr, self.concept_batch))


FULL = BuildSize()
# World 6's recipe (measured, not shipped; see docs/world.md): the class-code stage, a
# decoder stage that also blurs the picture and sees the denoiser's own redraws, and
# shorter budgets so that the build stays near its hour.
WORLD6 = dataclasses.replace(FULL, vae_minutes=10.0, code_steps=1_000, denoiser_minutes=30.0, instance_minutes=8.0,
                             decoder_picture_blur=1.5, decoder_denoised=2_000)
# World 7's recipe, the shipped world's: world 6's, with its denoiser trained on for 25
# minutes more. Shapes form late: on world 6's denoiser the judge's class figure went from
# 0.49 to 0.855 over those 3,927 more steps (docs/world.md).
WORLD7 = dataclasses.replace(WORLD6, continue_minutes=25.0)
# World 8's recipe (measured, not shipped; see docs/world.md): world 7's with world 5's
# decoder stage (detail blur only), which keeps the concepts' colours through the codec
# (round trip of concept renders: star 56% -> 84%, ball 41% -> 97%), and the ball trained
# at batch 16 and 1e-2 for 1,500 steps. Its check passes 16 figures to world 7's 14, but
# that ball concept loses the beach under every sampler, superclass sampling included.
# The star keeps world 7's settings: at the ball's it breaks under every sampler.
WORLD8 = dataclasses.replace(WORLD7, decoder_minutes=6.0, decoder_picture_blur=0.0, decoder_denoised=0,
                             concept_by_name=(("ball", 1_500, 1e-2, 16),))
# The recipes `world build --recipe` names: world 7's is the shipped world's.
RECIPES = {"world5": FULL, "world6": WORLD6, "world7": WORLD7, "world8": WORLD8}
SHIPPED_RECIPE = "world7"
# Every part and stage of a full build, a few steps each: for tests of the wiring, not of quality.
QUICK = BuildSize(images=200, vae_steps=8, vae_batch=8, vae_minutes=1.0, code_steps=4, code_batch=8, code_minutes=0.5,
                  denoiser_steps=12, denoiser_batch=8,
                  denoiser_minutes=1.0, metric_steps=8, metric_batch=32, metric_minutes=1.0, concept_steps=4,
                  concept_class_images=2, decoder_steps=4, decoder_minutes=0.5, decoder_picture_blur=1.5,
                  decoder_denoised=8,
                  instances=8, instance_steps=6,
                  instance_minutes=0.5, continue_minutes=0.5, continue_steps=4)


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def render_data(n: int, seed: int, *, with_masks: bool = False):
    """`n` captioned renders: images (n, 64, 64, 3) uint8 and captions; with `with_masks`,
    also each image's object pixels (n, 64, 64) bool (as `codec_batch` does)."""
    rng = np.random.default_rng(seed)
    pairs = [random_caption(rng) for _ in range(n)]
    scenes = [s for s, _ in pairs]
    images, captions = render_batch(scenes), [c for _, c in pairs]
    return (images, captions, np.stack([object_mask(s) for s in scenes])) if with_masks else (images, captions)


def object_cover(masks: np.ndarray) -> torch.Tensor:
    """(n, 1, 16, 16) bool: whether the object covers some of each latent pixel's patch."""
    return F.adaptive_avg_pool2d(torch.from_numpy(masks).float()[:, None], models.LATENT_SIZE) > 0.05


def cover_weights(covered: torch.Tensor, object_weight: float) -> torch.Tensor:
    """Per latent pixel loss weights: `object_weight` where `covered`, 1 elsewhere."""
    return 1.0 + (object_weight - 1.0) * covered.float()


def world_latents(folder: Path, vae, n: int, seed: int) -> dict:
    """The world renders behind the denoiser (`render_data(n, seed)`), encoded by `vae`:
    {"mean", "std", "captions", "cover" (`object_cover`)}.

    The first denoiser run and its continuation train on the same renders through the same
    encoder (later stages change only the decoder), so a build encodes them once, about
    three minutes at 40,000 images on 2 cores, and keeps them in its `.work` folder (also
    across a resumed build); a file made for another size or seed is made again."""
    path = folder / ".work" / LATENTS_FILE
    if path.is_file():
        cached = torch.load(path, weights_only=True)
        if cached.get("n") == n and cached.get("seed") == seed:
            return cached
    _log(f"rendering and encoding {n} training images for the denoiser")
    images, captions, masks = render_data(n, seed, with_masks=True)
    mean, std = encode(vae, images)
    data = {"n": n, "seed": seed, "mean": mean, "std": std, "captions": captions, "cover": object_cover(masks)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def timestep_distribution(scheduler, spread: float = 2.0, uniform_share: float = 0.3) -> torch.Tensor:
    """Probabilities of the training timesteps: `1 - uniform_share` of them normal in
    log-SNR around SNR 1 (standard deviation `spread`), the rest uniform.

    Under the world's linear schedule, 40% of uniformly drawn timesteps have SNR below
    0.03, where the best prediction is the prompt's average image and is learned early;
    the shapes are decided at SNR 0.1 to 10. Drawing timesteps around SNR 1 gives those
    65% of the steps instead of 40% (the idea of Stable Diffusion 3's logit-normal
    sampling, arXiv:2403.03206, section 3.1)."""
    alphas = scheduler.alphas_cumprod
    log_snr = (alphas / (1 - alphas)).log()
    density = torch.exp(-0.5 * (log_snr / spread) ** 2) * torch.gradient(log_snr)[0].abs()
    return (1 - uniform_share) * density / density.sum() + uniform_share / len(alphas)


# ---------------------------------------------------------------------------- parts

def _progress(step: int, steps: int, start: float, minutes: float) -> float:
    """How far a part is through its budget, by steps or by wall-clock time, whichever is
    further: learning-rate schedules follow it, and the part ends at 1."""
    return max(step / steps, (time.time() - start) / (60 * minutes))


def _cosine(progress: float, floor: float = 0.1) -> float:
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _scheduled_steps(opt, steps: int, minutes: float, peak_lr: float, warmup: int, floor: float = 0.1):
    """The step indices of a part with a step and a wall-clock budget, setting the
    learning rate of each (linear warm-up, then cosine over the budget down to `floor`
    of the peak). Every part of the build trains through it."""
    start = time.time()
    for step in range(steps):
        done = _progress(step, steps, start, minutes)
        if done >= 1.0:
            return
        for g in opt.param_groups:
            g["lr"] = peak_lr * min(1.0, (step + 1) / warmup) * _cosine(done, floor)
        yield step


def _optimiser_step(opt, loss: torch.Tensor, step: int, part: str, steps: int) -> float:
    """One optimiser step on `loss`, logged every 50 steps; returns the loss's value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    value = loss.item()
    if step % 50 == 0:
        _log(f"{part} step {step + 1}/{steps} loss {value:.4f}")
    return value


def _image_batch(images: np.ndarray, batch: int, gen: torch.Generator):
    idx = torch.randint(len(images), (batch,), generator=gen).numpy()
    return idx, to_tensor(images[idx])


ANCHORED = 3          # latent channels that hold the image averaged over each latent pixel's patch
LATENT_NOISE = 0.1    # std of the noise an anchored codec's decoder learns through (after warm-up)
CLASS_CHANNEL = 3     # with a class anchor: the latent channel that holds the object's class code
CLASS_CODES = torch.linspace(-1.0, 1.0, len(CLASSES))   # code of CLASSES[k], spread over the latent's range


def class_maps(masks: np.ndarray, classes: np.ndarray) -> torch.Tensor:
    """(n, 1, 16, 16): each latent pixel's share of object pixels times the object's class
    code, the target of a class-anchored codec's `CLASS_CHANNEL`."""
    cover = F.avg_pool2d(torch.from_numpy(masks).float()[:, None], models.IMAGE_SIZE // models.LATENT_SIZE)
    return cover * CLASS_CODES[torch.from_numpy(classes)][:, None, None, None]


def train_autoencoder(images: np.ndarray, size: BuildSize, seed: int, codes: torch.Tensor | None = None):
    """AutoencoderKL on `images` (the codec's renders, `scene.codec_batch`): L1 + MSE
    reconstruction with a light KL term.

    With `size.latent_anchor`, latent channels 0-2 are also pulled towards the image
    averaged over each latent pixel's 4x4 patch, and the decoder learns from the latent's
    mean plus noise of std `LATENT_NOISE`. Left to itself, the codec writes an object's
    shape as a code spread over small, high-frequency latent values: it reconstructs
    shapes, but a one-pixel blur of the latent or a denoiser's small errors lose them,
    and the denoiser draws blobs. Anchored, the latent is a small picture of the scene
    with detail channels beside it, the kind of signal diffusion models learn shapes of
    (the argument of "diffusability" in arXiv:2502.14831).

    With `codes` (`class_maps` of the images), channel `CLASS_CHANNEL` is pulled to the
    object's class code as well: the shape, which otherwise lives in fine detail a small
    denoiser draws as a blob, becomes a flat value over the object, the kind of signal
    (like an object's colour) the denoiser learns from the prompt first. Measured on
    world 5: the encoder learns it, the decoder does not use it (decoded with another
    class's code, 3% of shapes follow the code)."""
    torch.manual_seed(seed)
    vae = models.autoencoder()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    anchored = size.latent_anchor > 0
    loss_value, start, steps_done = float("nan"), time.time(), 0
    for step in _scheduled_steps(opt, size.vae_steps, size.vae_minutes, 2e-3, 50):
        idx, x = _image_batch(images, size.vae_batch, gen)
        posterior = vae.encode(x).latent_dist
        kl = posterior.kl().mean() / x[0].numel()
        if anchored:
            noise = LATENT_NOISE * torch.randn(posterior.mean.shape, generator=gen) if step >= 200 else 0.0
            recon = vae.decode(posterior.mean + noise).sample
            anchor = F.mse_loss(posterior.mean[:, :ANCHORED], F.avg_pool2d(x, 4))
            if codes is not None:
                code = posterior.mean[:, CLASS_CHANNEL:CLASS_CHANNEL + 1]
                anchor = anchor + F.mse_loss(code, codes[torch.from_numpy(idx)])
        else:
            recon = vae.decode(posterior.sample(generator=gen)).sample
            anchor = torch.zeros(())
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + size.latent_anchor * anchor + 1e-4 * kl
        loss_value, steps_done = _optimiser_step(opt, loss, step, "autoencoder", size.vae_steps), step + 1
    vae.eval().requires_grad_(False)
    if anchored:
        set_posterior_std(vae, LATENT_NOISE)
    return vae, {"steps": steps_done, "batch": size.vae_batch, "final_loss": loss_value,
                 "seconds": round(time.time() - start, 1)}


def train_class_code(vae, images: np.ndarray, codes: torch.Tensor, size: BuildSize, seed: int):
    """The encoder alone, trained again so that latent channel `CLASS_CHANNEL` holds the
    object's class code (`codes`, from `class_maps`) while every other channel keeps the
    value the autoencoder gave it (the decoder is untouched, so nothing it learned changes).

    Trained jointly with reconstruction, the code stays a weak hint (on world 5, balls
    and boxes came out at -0.60 and -0.69 where their codes are -1 and -0.33): the
    decoder learns shapes from the picture, so nothing asks the encoder to get the code
    right. On its own the encoder learns it in minutes: on a trial codec, after 4 minutes
    the nearest code was the object's class on every captioned render of 300."""
    torch.manual_seed(seed)
    frozen = copy.deepcopy(vae).eval().requires_grad_(False)
    params = list(vae.encoder.parameters()) + list(vae.quant_conv.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.encoder.train()
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    code = slice(CLASS_CHANNEL, CLASS_CHANNEL + 1)
    others = [c for c in range(vae.config.latent_channels) if c != CLASS_CHANNEL]
    loss_value, start, steps_done = float("nan"), time.time(), 0
    for step in _scheduled_steps(opt, size.code_steps, size.code_minutes, 5e-4, 20):
        idx, x = _image_batch(images, size.code_batch, gen)
        mean = vae.encode(x).latent_dist.mean
        with torch.no_grad():
            kept = frozen.encode(x).latent_dist.mean[:, others]
        loss = F.mse_loss(mean[:, code], codes[torch.from_numpy(idx)]) + F.mse_loss(mean[:, others], kept)
        loss_value, steps_done = _optimiser_step(opt, loss, step, "class code", size.code_steps), step + 1
    vae.eval().requires_grad_(False)
    set_posterior_std(vae, LATENT_NOISE)
    return vae, {"steps": steps_done, "batch": size.code_batch, "final_loss": loss_value,
                 "seconds": round(time.time() - start, 1)}


@torch.no_grad()
def set_posterior_std(vae, std: float) -> None:
    """Make the encoder's posterior std `std` everywhere. An anchored codec's decoder
    learned from the mean plus noise of that std, so that is the uncertainty its
    latents have; the KL term alone would have left the log-variance near 0 (std 1),
    and everything that samples the posterior (the denoiser's data, concept training)
    would drown the latent in noise."""
    n = vae.config.latent_channels
    vae.quant_conv.weight[n:] = 0.0
    vae.quant_conv.bias[n:] = 2 * math.log(std)


OBJECT_WEIGHT = 10.0


def blurred_detail(z: torch.Tensor, sigma: float, picture_sigma: float = 0.0) -> torch.Tensor:
    """`z` with its detail channels (those after the anchored picture and the class code)
    blurred by a Gaussian of `sigma` latent pixels, the soft detail a small denoiser
    draws, and its anchored picture by one of `picture_sigma`; the class code stays sharp."""
    def blur(x, s):
        return gaussian_blur(x, 2 * math.ceil(2 * s) + 1, s) if s > 0 else x
    first = CLASS_CHANNEL + 1
    return torch.cat([blur(z[:, :ANCHORED], picture_sigma), z[:, ANCHORED:first], blur(z[:, first:], sigma)], dim=1)


@torch.no_grad()
def denoised_latents(pipe, images: np.ndarray, captions: list[str], seed: int, *, steps: int = 25,
                     start: tuple[float, float] = (0.3, 0.7), guidance: tuple[float, float] = (3.0, 7.0),
                     batch: int = 100) -> torch.Tensor:
    """Latents of `images` as the pipeline's own denoiser redraws them: each image is
    encoded, noised to a random point of a `steps`-step DDIM schedule (a share `start`
    of the way through it) and denoised over the rest with classifier-free guidance of a
    random scale in `guidance`, conditioned on its caption, the way a sampler ends
    (SDEdit, arXiv:2108.01073). Unscaled, as the decoder reads them.

    The object keeps its place, size and colour, but its outline is the denoiser's: a
    decoder trained to draw the render from these was meant to learn to draw the shape the
    class code names where the picture is the denoiser's blob. Measured on world 6, the
    decoder stage with them left the base model's class figure where it was (0.49)."""
    gen = torch.Generator().manual_seed(seed)
    scheduler = models.ddim_scheduler()
    scheduler.set_timesteps(steps)
    scaling = pipe.vae.config.scaling_factor
    empty = pipe.text_encoder(tokenize(pipe.tokenizer, [""]))[0]
    out = []
    for i in range(0, len(images), batch):
        x, text = to_tensor(images[i:i + batch]), captions[i:i + batch]
        z0 = pipe.vae.encode(x).latent_dist.mean * scaling
        first = int(steps * (start[0] + (start[1] - start[0]) * torch.rand((), generator=gen).item()))
        scale = guidance[0] + (guidance[1] - guidance[0]) * torch.rand((len(x), 1, 1, 1), generator=gen)
        z = scheduler.add_noise(z0, torch.randn(z0.shape, generator=gen), scheduler.timesteps[first:first + 1])
        cond = torch.cat([empty.expand(len(x), -1, -1), pipe.text_encoder(tokenize(pipe.tokenizer, text))[0]])
        for t in scheduler.timesteps[first:]:
            uncond, conditioned = pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=cond).sample.chunk(2)
            z = scheduler.step(uncond + scale * (conditioned - uncond), t, z).prev_sample
        out.append(z / scaling)
    return torch.cat(out)


def finetune_decoder(vae, images: np.ndarray, masks: np.ndarray, size: BuildSize, seed: int,
                     detail_blur: float = 0.0, picture_blur: float = 0.0, denoised=None):
    """The autoencoder's decoder alone, trained again with the object's pixels weighted
    `OBJECT_WEIGHT` times a background pixel's.

    Backgrounds fill most of every image and come in ten looks, so the first run spends
    its steps on them; an object's colours outside the palette (a concept's teal, a black
    stripe) come out as the nearest palette colour. The encoder stays frozen, so every
    latent the denoiser and the concepts learned keeps its meaning: only how latents
    become pixels improves (Stable Diffusion's own decoder was fine-tuned this way after
    its UNet was trained).

    With `detail_blur`, each batch's detail channels are blurred by a random sigma up to
    it, so the decoder learns to draw an object's shape from the anchored picture when
    the fine detail is soft, as a denoiser's is (otherwise it reads shape from the detail
    alone and paints soft detail as a blob). With `picture_blur`, the anchored picture is
    blurred too (by its own random sigma), so that where both are soft the decoder draws
    the shape the class code names (world 6's denoiser writes the prompt's code, but draws
    the picture's edges as a blob). Measured: it helps through blur, yet a swapped code
    still loses to the picture (docs/world.md).

    With `denoised` (latents from `denoised_latents`, their renders and object masks),
    a share `size.decoder_denoised_share` of the batches are those latents, to be drawn
    as the renders they came from."""
    torch.manual_seed(seed)
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    loss_value, start, steps_done = float("nan"), time.time(), 0
    for step in _scheduled_steps(opt, size.decoder_steps, size.decoder_minutes, 5e-4, 20):
        redrawn = denoised is not None and torch.rand((), generator=gen).item() < size.decoder_denoised_share
        source, source_masks = (denoised[1], denoised[2]) if redrawn else (images, masks)
        idx, x = _image_batch(source, size.vae_batch, gen)
        weight = 1.0 + (OBJECT_WEIGHT - 1.0) * torch.from_numpy(source_masks[idx]).float()[:, None]
        if redrawn:
            z = denoised[0][torch.from_numpy(idx)]
        else:
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample(generator=gen)
                if detail_blur or picture_blur:
                    sigma = detail_blur * torch.rand((), generator=gen).item()
                    picture_sigma = picture_blur * torch.rand((), generator=gen).item() if picture_blur else 0.0
                    z = blurred_detail(z, sigma, picture_sigma)
        error = vae.decode(z).sample - x
        loss = (weight * (error.abs() + error.square())).mean() / weight.mean()
        loss_value, steps_done = _optimiser_step(opt, loss, step, "decoder", size.decoder_steps), step + 1
    vae.eval().requires_grad_(False)
    return vae, {"steps": steps_done, "batch": size.vae_batch, "final_loss": loss_value,
                 "object_weight": OBJECT_WEIGHT, "detail_blur": detail_blur, "picture_blur": picture_blur,
                 "denoised": 0 if denoised is None else len(denoised[0]),
                 "seconds": round(time.time() - start, 1)}


@torch.no_grad()
def encode(vae, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(to_tensor(images[i:i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


EMA_DECAY = 0.995   # a short run: average over its last few hundred steps only


class EMA:
    """Exponential moving average of parameters (the weights that ship)."""

    def __init__(self, modules, decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


MIN_SNR_GAMMA = 5.0


def min_snr_weight(snr: torch.Tensor, prediction_type: str, gamma: float = MIN_SNR_GAMMA) -> torch.Tensor:
    """Loss weight that caps the weight a timestep's x0 error gets, in the spirit of
    Min-SNR-gamma (arXiv:2303.09556): an epsilon loss weighs x0 errors by SNR and is
    weighted min(SNR, gamma) / SNR; a v loss weighs them by SNR + 1 and is weighted
    (min(SNR, gamma) + 1) / (SNR + 1). Nearly clean timesteps, whose loss would dominate,
    are weighted down; the noisy ones, where the prompt decides the layout, keep weight 1
    (the paper's v weight, min(SNR, gamma) / (SNR + 1), would all but drop them)."""
    if prediction_type == "v_prediction":
        return (snr.clamp(max=gamma) + 1) / (snr + 1)
    return snr.clamp(max=gamma) / snr


def train_denoiser(latent_mean, latent_std, scaling: float, captions: list[str], tokenizer,
                   size: BuildSize, seed: int, *, weight_map: torch.Tensor | None = None, start_from=None,
                   peak_lr: float = 1e-3):
    """UNet and text encoder trained together on the scheduler's prediction type (v for
    the world), with a Min-SNR-style loss weight, empty captions included
    (they are the unconditional branch of classifier-free guidance), timesteps drawn
    uniformly or, with `size.timesteps == "snr-normal"`, by `timestep_distribution`.
    `weight_map` (n, 1, h, w) weighs each latent pixel's error (`cover_weights`: the
    object's pixels can count more, where the ten textured backgrounds, which fill most of
    every image, would otherwise take the steps the shapes need). `start_from` is a
    (unet, text_encoder) pair to continue training."""
    torch.manual_seed(seed)
    unet, text_encoder = start_from or (models.denoiser(), models.text_encoder())
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    noise_scheduler = models.ddpm_scheduler()
    ids = tokenize(tokenizer, captions)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    kind = noise_scheduler.config.prediction_type
    n_t = noise_scheduler.config.num_train_timesteps
    t_probs = timestep_distribution(noise_scheduler) if size.timesteps == "snr-normal" else None
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    ema = EMA([unet, text_encoder], decay=EMA_DECAY)
    gen = torch.Generator().manual_seed(seed)
    start, losses, steps_done = time.time(), [], 0
    for step in _scheduled_steps(opt, size.denoiser_steps, size.denoiser_minutes, peak_lr, 100):
        idx = torch.randint(len(captions), (size.denoiser_batch,), generator=gen)
        z0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling
        noise = torch.randn(z0.shape, generator=gen)
        t = (torch.randint(0, n_t, (len(idx),), generator=gen) if t_probs is None
             else torch.multinomial(t_probs, len(idx), replacement=True, generator=gen))
        zt = noise_scheduler.add_noise(z0, noise, t)
        cond = text_encoder(ids[idx])[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        target = noise_scheduler.get_velocity(z0, noise, t) if kind == "v_prediction" else noise
        error = F.mse_loss(pred, target, reduction="none")
        if weight_map is None:
            per_image = error.mean((1, 2, 3))
        else:
            w = weight_map[idx]
            per_image = (error * w).sum((1, 2, 3)) / (w.sum((1, 2, 3)) * error.shape[1])
        loss = (min_snr_weight(snr[t], kind) * per_image).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        losses.append(loss.item())
        steps_done = step + 1
        if step % 100 == 0:
            rate = steps_done / max(time.time() - start, 1e-6)
            _log(f"denoiser step {steps_done}/{size.denoiser_steps} loss {np.mean(losses[-100:]):.4f} "
                 f"({rate:.2f} steps/s)")
    ema.copy_to_model()
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return unet, text_encoder, {"steps": steps_done, "batch": size.denoiser_batch,
                                "final_loss": float(np.mean(losses[-200:])) if losses else float("nan"),
                                "seconds": round(time.time() - start, 1), "ema_decay": EMA_DECAY}


def identifier_words(tokenizer, n: int) -> list[str]:
    """`n` made-up three-consonant words that the CLIP tokenizer reads as one token each
    (like "sks"), in a fixed order; none is a concept's identifier."""
    taken = {word for c in CONCEPTS.values() for word in c["phrase"].split()}
    words = []
    for letters in itertools.product("bcdfghjklmnpqrtvwxz", repeat=3):
        word = "".join(letters)
        if word not in taken and len(tokenizer(word).input_ids) == 3:
            words.append(word)
            if len(words) == n:
                return words
    raise ValueError(f"only {len(words)} one-token identifier words, {n} asked")


def train_instances(folder: Path, size: BuildSize, seed: int) -> dict:
    """Continue the denoiser and text encoder of the pipeline in `folder` on world pairs
    mixed with named instances (`scene.named_instance_batch`), then write them back."""
    pipe = load_pipeline(folder)
    names = identifier_words(pipe.tokenizer, size.instances)
    total = max(size.images // 2, 2)
    n_named = max(round(total * size.instance_share), 1)
    _log(f"rendering {total - n_named} world pairs and {n_named} named-instance pairs")
    images, captions, masks = render_data(total - n_named, seed + 2, with_masks=True)
    named_images, named_captions, named_masks = named_instance_batch(n_named, seed, names)
    images = np.concatenate([images, named_images])
    masks = np.concatenate([masks, named_masks])
    mean, std = encode(pipe.vae, images)
    record = _train_pipeline_on(folder, pipe, mean, std, captions + named_captions, object_cover(masks), size,
                                size.instance_steps, size.instance_minutes, seed + 2)
    return {**record, "names": names, "named_pairs": n_named, "world_pairs": total - n_named}


def _train_pipeline_on(folder: Path, pipe, mean: torch.Tensor, std: torch.Tensor, captions: list[str],
                       cover: torch.Tensor, size: BuildSize, steps: int, minutes: float, seed: int) -> dict:
    """Train the pipeline's denoiser and text encoder on from where they are, on these
    encoded renders, for `steps` or `minutes`, at half the first run's peak learning rate,
    and write them back into `folder`: the later denoiser stages (named instances,
    continuation)."""
    stage = dataclasses.replace(size, denoiser_steps=steps, denoiser_minutes=minutes)
    unet, text_encoder, record = train_denoiser(
        mean, std, pipe.vae.config.scaling_factor, captions, pipe.tokenizer, stage, seed,
        weight_map=cover_weights(cover, size.object_weight), start_from=(pipe.unet, pipe.text_encoder),
        peak_lr=5e-4)
    write_pipeline(pipe.vae, text_encoder, unet, folder)
    return record


def continue_denoiser(folder: Path, size: BuildSize, seed: int) -> dict:
    """Train the denoiser and text encoder of the pipeline in `folder` on for
    `size.continue_minutes`, on the world's renders alone (the first run's data) at half
    its peak learning rate, then write them back.

    Shapes are what a small denoiser learns last: colours and contexts are right within
    minutes, while the objects stay blobs for thousands of steps. On world 6's denoiser
    (about 5,900 steps with its named instances), 3,927 more steps took the judge's class
    figure from 0.49 to 0.855 of 200 prompts."""
    pipe = load_pipeline(folder)
    data = world_latents(folder, pipe.vae, size.images, seed)
    return _train_pipeline_on(folder, pipe, data["mean"], data["std"], data["captions"], data["cover"], size,
                              size.continue_steps, size.continue_minutes, seed + 5)


def full_caption(cls: str, colour: str, context: str) -> str:
    phrase = CONTEXTS[context]
    return f"a photo of a {colour} {cls}" + (f" {phrase}" if phrase else "")


def all_captions() -> tuple[list[str], list[tuple[str, str, str]]]:
    """Every fully specified caption, with its (class, colour, context)."""
    labels = [(c, col, ctx) for c in CLASSES for col in COLOURS for ctx in CONTEXTS]
    return [full_caption(*l) for l in labels], labels


def _metric_batch(rng: np.random.Generator, n: int):
    scenes = [random_scene(rng) for _ in range(n)]
    labels = [(s.cls, s.colour, s.context) for s in scenes]
    return render_batch(scenes), labels


def metric_normalize(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the CLIP normalisation the metric model is trained and used with."""

    x = (x + 1) / 2
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise and blur of the kind a small generator leaves, so the metric model is not
    thrown by imperfect samples."""
    x = x + torch.randn(x.shape, generator=gen) * 0.05 * torch.rand(len(x), 1, 1, 1, generator=gen)
    blur = torch.rand(len(x), generator=gen) < 0.3
    if blur.any():
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :]) / 16
        w = k.expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), w, groups=3)
    return x.clamp(-1, 1)


def train_metric_model(size: BuildSize, seed: int):
    """CLIP trained contrastively on renders and their full captions. Several images of
    a batch share a caption, so the targets are every matching pair (multi-positive)."""

    torch.manual_seed(seed)
    model = models.metric_model()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    captions, labels = all_captions()
    caption_tokens = tokenizer(captions)
    index = {l: i for i, l in enumerate(labels)}
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    rng = np.random.default_rng(seed + 1)
    gen = torch.Generator().manual_seed(seed)
    start, loss_value, steps_done = time.time(), float("nan"), 0
    for step in _scheduled_steps(opt, size.metric_steps, size.metric_minutes, 1e-3, 50, floor=0.0):
        images, batch_labels = _metric_batch(rng, size.metric_batch)
        x = metric_normalize(_degrade(to_tensor(images), gen))
        ids = torch.tensor([index[l] for l in batch_labels])
        img = F.normalize(model.encode_image(x), dim=-1)
        unique, inverse = torch.unique(ids, return_inverse=True)
        txt = F.normalize(model.encode_text(caption_tokens[unique]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        # image -> its caption among the batch's distinct captions; caption -> each of its images
        loss_i = F.cross_entropy(logits, inverse)
        target_t = F.one_hot(inverse, len(unique)).T.float()
        target_t = target_t / target_t.sum(1, keepdim=True)
        loss_t = -(target_t * F.log_softmax(logits.T, dim=1)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_value, steps_done = loss.item(), step + 1
        if step % 50 == 0:
            _log(f"metric model step {step + 1}/{size.metric_steps} loss {loss_value:.4f}")
    model.eval().requires_grad_(False)
    return model, {"steps": steps_done, "batch": size.metric_batch, "final_loss": loss_value,
                   "seconds": round(time.time() - start, 1)}


def save_metric_model(model, folder: Path) -> None:
    """open_clip's own folder layout (config + safetensors), read back by
    `open_clip.create_model("local-dir:FOLDER")`."""

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": models.METRIC_MODEL_CONFIG,
              "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD),
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))


def load_metric_model(folder: Path):
    return open_clip.create_model(f"local-dir:{folder}").eval()


def write_pipeline(vae, text_encoder, unet, folder: Path) -> None:
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=models.ddim_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    # Weights ship in float16 (half the size); everything loads and runs them in float32.
    pipe.to(torch.float16)
    pipe.save_pretrained(folder, safe_serialization=True)
    pipe.to(torch.float32)


def load_pipeline(folder: Path):
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weights_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        h.update(path.relative_to(folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def train_concepts(folder: Path, size: BuildSize, seed: int, log=_log) -> dict:
    """The two personal concepts, fine-tuned by SVDiff on their five plain-background
    references, long enough to forget contexts (the failure the samplers repair)."""

    pipe = load_pipeline(folder)
    results = {}
    for i, (name, concept) in enumerate(CONCEPTS.items()):
        steps, lr, batch = size.concept_settings(name)
        scenes = reference_scenes(name, n=5, seed=seed + i)
        images = [Image.fromarray(render(s)) for s in scenes]
        out = folder / "concepts" / name
        summary = train_concept(
            pipe, images, phrase=concept["phrase"], superclass=concept["superclass"], method="svdiff",
            out=out, steps=steps, lr=lr, seed=seed + i, overwrite=True, batch_size=batch,
            prior_preservation=size.concept_class_images > 0, class_images=size.concept_class_images,
            base_model="../..",  # the world folder that holds the concept, wherever it is copied
            progress=_every(100, lambda p, n=name: log(f"concept {n} step {p['step']}/{p['steps']} loss {p['loss']:.4f}")))
        results[name] = {**{k: summary[k] for k in ("method", "steps", "seconds", "final_loss") if k in summary},
                         "lr": lr, "batch": batch}
    return results


def _every(n: int, fn):
    def call(p):
        if p["step"] % n == 0 or p["step"] == p["steps"]:
            fn(p)
    return call


# ---------------------------------------------------------------------------- the build

def _check_out(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()) and not resume:
        raise UserError(f"--out: {out} is not empty; give a new folder or --resume an interrupted build")
    if resume and out.exists() and any(out.iterdir()) and not (out / STATE_FILE).is_file():
        raise UserError(f"--resume: {out} holds no interrupted world build ({STATE_FILE} is missing)")


def build_world(out: str | Path, *, quick: bool = False, seed: int = 0, resume: bool = False,
                size: BuildSize | None = None, check: bool = True) -> dict:
    """Build the world into `out` and return its `world.json` record."""
    out = Path(out)
    _check_out(out, resume)
    size = size or (QUICK if quick else RECIPES[SHIPPED_RECIPE])
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"parts": {}}

    def done(part: str, record: dict) -> None:
        state["parts"][part] = record
        state_path.write_text(json.dumps(state, indent=2))

    torch_threads = torch.get_num_threads()
    total_start = time.time()
    pipeline_ready = all((out / p).exists() for p in PIPELINE_PARTS) and "denoiser" in state["parts"]
    # The metric model comes first: with text_encoder="metric" its text tower starts the
    # denoiser's text encoder (one trained from scratch beside the denoiser kept prompts that
    # differ only in the class word 4x closer than the contrastive tower does).
    if "metric_model" not in state["parts"]:
        model, record = train_metric_model(size, seed)
        save_metric_model(model, out / "metric")
        done("metric_model", record)
    if not pipeline_ready:
        if "autoencoder" in state["parts"] and (out / ".work" / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(str(out / ".work" / "vae")).eval().requires_grad_(False)
        else:
            _log(f"rendering {size.images} autoencoder images")
            codec_images, codec_masks, codec_classes = codec_batch(size.images, seed, with_masks=True,
                                                                   with_classes=True)
            codes = class_maps(codec_masks, codec_classes) if size.class_anchor and size.latent_anchor else None
            vae, record = train_autoencoder(codec_images, size, seed, codes)
            record["class_anchor"] = codes is not None
            if codes is not None and size.code_steps:
                vae, record["class_code"] = train_class_code(vae, codec_images, codes, size, seed)
            vae.save_pretrained(str(out / ".work" / "vae"))
            done("autoencoder", record)
        data = world_latents(out, vae, size.images, seed)
        mean, std = data["mean"], data["std"]
        scaling = float(1.0 / (mean.std().item() or 1.0))
        vae.register_to_config(scaling_factor=scaling)
        start_from = None
        if size.text_encoder == "metric":
            torch.manual_seed(seed)
            start_from = (models.denoiser(), models.text_encoder_from_metric(load_metric_model(out / "metric")))
        unet, text_encoder, record = train_denoiser(mean, std, scaling, data["captions"], clip_tokenizer(), size,
                                                    seed, weight_map=cover_weights(data["cover"], size.object_weight),
                                                    start_from=start_from)
        record["scaling_factor"] = scaling
        record["text_encoder"] = size.text_encoder
        write_pipeline(vae, text_encoder, unet, out)
        done("denoiser", record)
    if size.instances and "instances" not in state["parts"]:
        done("instances", train_instances(out, size, seed))
    if size.continue_minutes and "continued" not in state["parts"]:
        done("continued", continue_denoiser(out, size, seed))
    if "concepts" not in state["parts"]:
        done("concepts", train_concepts(out, size, seed))
        _log("concepts trained")
    if "decoder" not in state["parts"]:
        _log(f"rendering {size.images} autoencoder images for the decoder")
        images, masks = codec_batch(size.images, seed + 1, with_masks=True)
        vae = AutoencoderKL.from_pretrained(str(out / "vae"), torch_dtype=torch.float32)
        denoised = None
        if size.decoder_denoised:   # only then the denoiser and text encoder are loaded too
            _log(f"redrawing {size.decoder_denoised} world renders with the denoiser")
            renders, captions, render_masks = render_data(size.decoder_denoised, seed + 3, with_masks=True)
            denoised = (denoised_latents(load_pipeline(out), renders, captions, seed + 3), renders, render_masks)
        vae, record = finetune_decoder(vae, images, masks, size, seed, detail_blur=size.decoder_detail_blur,
                                       picture_blur=size.decoder_picture_blur, denoised=denoised)
        vae.to(torch.float16).save_pretrained(str(out / "vae"), safe_serialization=True)
        done("decoder", record)
    shutil.rmtree(out / ".work", ignore_errors=True)
    world = {
        "format": "personalize-world/1",
        "seed": seed, "quick": quick, "size": asdict(size),
        "image_size": models.IMAGE_SIZE, "latent_size": models.LATENT_SIZE,
        "parts": state["parts"], "torch_threads": torch_threads,
        "build_seconds": round(time.time() - total_start, 1),
        "weights_sha256": weights_hash(out),
        "concepts": {name: {"path": f"concepts/{name}", **c} for name, c in CONCEPTS.items()},
        "metric_model": "metric",
    }
    (out / "world.json").write_text(json.dumps(world, indent=2))
    state_path.unlink(missing_ok=True)
    if check:
        from .check import run_check
        world["check"] = run_check(out, quick=quick)
        (out / "world.json").write_text(json.dumps(world, indent=2))
    return world
