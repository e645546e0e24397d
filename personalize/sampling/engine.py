"""The one denoising loop that runs every sampler of the study.

It follows a sampler's per-step plan (`samplers.plan`): each step evaluates only the
rows the plan names, all in one batched denoiser call, and combines them with the
pure rules of `guidance.py`. Attention work (mask maps, Photoswap) happens in the
processors of `attention.py`, which the loop tells the step index explicitly. What
differs between pipeline families (SD, SD-XL, PixArt-alpha) is in `backbones.py`.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from personalize.sampling import guidance
from personalize.sampling.attention import AttentionHooks
from personalize.sampling.backbones import Backbone, Conditioning, backbone, batch_conditioning
from personalize.errors import UserError
from personalize.prompts import PromptPair
from personalize.sampling.samplers import C, S, U, SamplerConfig, Step, plan


class Stopped(RuntimeError):
    """The run was stopped from outside (the app's Stop button) before it finished."""


@dataclass
class RunResult:
    images: list                     # PIL images
    latents: torch.Tensor            # final latents of the output trajectory, (n, c, h, w)
    rows: int                        # denoiser batch rows evaluated, all images together
    seconds: float
    token_index: int | None = None   # masked / photoswap: position of the concept identifier
    step_rows: list[int] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)   # (height, width) of the images, defaults filled in


StepCallback = Callable[[dict], None]


def run(pipe, prompts: PromptPair, config: SamplerConfig, *, seed: int = 0, num_images: int = 1,
        height: int | None = None, width: int | None = None, negative_prompt: str = "",
        concept_phrase: str | None = None, callback: StepCallback | None = None,
        stop: threading.Event | None = None, decode: bool = True) -> RunResult:
    """Sample `num_images` images of `prompts` with the sampler `config` on a diffusers
    pipeline `pipe` of a supported family (SD 1.x/2.x, SD-XL, PixArt-alpha; see
    `backbones.py`), from its components only: its own loop is not used.

    `callback` receives after every step a dict of named tensors: `step`, `timestep`,
    `latents` (after the step), `noise_pred` (the guided prediction), `predictions`
    (branch name -> prediction) and, for masked sampling, `attention` and `mask`.
    """
    started = time.perf_counter()
    model = backbone(pipe)
    # 1. Check inputs
    if num_images < 1:
        raise UserError(f"--num-images: {num_images} must be at least 1")
    default_height, default_width = model.default_size()
    height, width = height or default_height, width or default_width
    model.check_size(height, width)
    steps = plan(config)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # a fresh state for each run
    if any(step.fusion for step in steps):
        check_profusion_scheduler(scheduler)
    needs_mask = any(s.mask for s in steps)
    needs_swap = any(s.swap for s in steps)
    token_index = None
    if needs_mask or needs_swap:
        token_index = model.token_index(prompts.concept, concept_phrase) if concept_phrase else None
        if needs_mask and token_index is None:
            raise UserError("masked sampling needs the concept phrase to find its token in the prompt")

    generator = torch.Generator("cpu").manual_seed(seed)

    with torch.inference_mode():
        # 2. Encode the prompts the plan uses
        used = [b for b in (U, C, S) if any(b in s.rows + (s.fusion.rows if s.fusion else ()) for s in steps)]
        texts = {U: negative_prompt, C: prompts.concept, S: prompts.superclass}
        conds = {b: model.encode(texts[b], negative=b == U, size=(height, width)) for b in used}

        # 3. Prepare timesteps
        scheduler.set_timesteps(config.steps, device=model.device)
        timesteps = scheduler.timesteps
        extra_step_kwargs = pipe.prepare_extra_step_kwargs(generator, 0.0)
        output_index = model.step_output(len(timesteps))

        # 4. Prepare latents exactly as diffusers' pipeline draws them
        dtype = conds[used[0]]["encoder_hidden_states"].dtype
        latents = model.prepare_latents(num_images, height, width, dtype, generator)
        # Photoswap's superclass trajectory, with its own scheduler state (multistep schedulers
        # keep a history per trajectory)
        latents_s = latents.clone() if needs_swap else None
        scheduler_s = copy.deepcopy(scheduler) if needs_swap else None

        # 5. Denoising loop
        total_rows, step_rows = 0, []
        hooks = AttentionHooks(model.denoiser, capture=needs_mask, swap=needs_swap, token_index=token_index)
        with hooks:
            for i, t in enumerate(timesteps):
                if stop is not None and stop.is_set():
                    raise Stopped(f"stopped at step {i} of {config.steps}")
                step = steps[i]
                rows_before = total_rows
                if step.fusion:
                    latents, n_rows = fuse(model, scheduler, step, i, t, latents, conds, generator, hooks)
                    total_rows += n_rows
                if latents_s is not None and not step.swap:
                    latents_s = scheduler_s = None  # the superclass trajectory is no longer read
                hooks.begin(i, step, num_images)
                attention = mask = None
                if step.swap:
                    e, noise, noise_s = swap_step(model, scheduler, t, step, latents, latents_s, conds)
                    latents_s = advance(scheduler_s, noise_s, t, latents_s, extra_step_kwargs, output_index)
                else:
                    e = predict(model, scheduler, t, latents, step.rows, conds)
                    named = dict(zip(step.rows, e))
                    noise = combine(named, step.weights)
                    if step.mask:
                        attention = hooks.attention_map(latents.shape[-2:])
                        mask = guidance.quantile_mask(attention, step.mask.q)
                        noise = guidance.masked(noise, combine(named, step.outside), mask)
                total_rows += len(step.rows) * num_images
                latents = advance(scheduler, noise, t, latents, extra_step_kwargs, output_index)
                step_rows.append(total_rows - rows_before)
                if callback is not None:
                    callback({"step": i, "timestep": t, "latents": latents, "noise_pred": noise,
                              "predictions": dict(zip(step.rows, e)), "attention": attention, "mask": mask,
                              "rows": step.rows})

        # 6. Decode
        images = model.decode(latents, generator) if decode else []
    return RunResult(images, latents, total_rows, time.perf_counter() - started, token_index, step_rows,
                     (height, width))


def advance(scheduler, noise, t, latents, extra_step_kwargs: dict, output_index: int = 0) -> torch.Tensor:
    """One scheduler step; `output_index` picks the element of its output tuple (see
    `Backbone.step_output`)."""
    out = scheduler.step(noise, t, latents, **extra_step_kwargs, return_dict=False)
    return out[min(output_index, len(out) - 1)]


def combine(e: dict[str, torch.Tensor], weights: dict) -> torch.Tensor:
    """`guidance.guide` over predictions named by branch ({branch: tensor}) with the plan's
    weights ({branch: scale}); `e_u` may be absent when the weights sum to 1."""
    return guidance.guide(e.get(U), {b: (e[b], w) for b, w in weights.items()})


def swap_step(model: Backbone, scheduler, t, step: Step, latents, latents_s, conds):
    """Photoswap's step (arXiv:2305.18286): the concept trajectory `latents` and the
    superclass trajectory `latents_s` in one denoiser call, rows `[u, C | u, S]`; the
    attention processors swap between the C and S rows. Returns the four predictions and
    the guided noise of each trajectory."""
    x = torch.cat([latents, latents, latents_s, latents_s])
    e = predict(model, scheduler, t, x, step.rows, conds, repeat=False)
    noise = combine({U: e[0], C: e[1]}, step.weights)
    noise_s = combine({U: e[2], S: e[3]}, step.weights_s)
    return e, noise, noise_s


def predict(model: Backbone, scheduler, t, latents, rows, conds: dict[str, Conditioning], *,
            repeat: bool = True) -> list[torch.Tensor]:
    """One batched denoiser call over `rows` (branch names); returns one prediction per row
    group. With `repeat`, `latents` are shared by all row groups; otherwise `latents`
    already holds one block per row group."""
    n = latents.shape[0] if repeat else latents.shape[0] // len(rows)
    x = torch.cat([latents] * len(rows)) if repeat else latents
    x = scheduler.scale_model_input(x, t)
    out = model(x, t, batch_conditioning([conds[b] for b in rows], n))
    return list(out.chunk(len(rows)))


def check_profusion_scheduler(scheduler) -> None:
    if not isinstance(scheduler, DDIMScheduler):
        raise UserError(f"ProFusion runs on DDIM only, and this model's scheduler is "
                        f"{type(scheduler).__name__}; use --scheduler ddim")
    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(f"ProFusion needs an epsilon- or v-prediction model, this one predicts "
                        f"{scheduler.config.prediction_type!r}")


def previous_alpha(scheduler, i: int) -> float:
    """alphas_cumprod at the scheduler's timestep after step i (final_alpha_cumprod past the end)."""
    if i + 1 < len(scheduler.timesteps):
        return float(scheduler.alphas_cumprod[int(scheduler.timesteps[i + 1])])
    return float(scheduler.final_alpha_cumprod)


def fuse(model: Backbone, scheduler, step: Step, i: int, t, latents, conds, generator,
         hooks) -> tuple[torch.Tensor, int]:
    """ProFusion's fusion step (see `guidance.fusion_update`); returns the new latents and
    the rows it evaluated."""
    fusion = step.fusion
    a_t, a_p = float(scheduler.alphas_cumprod[int(t)]), previous_alpha(scheduler, i)
    sigma = guidance.fusion_sigma(a_t, a_p, fusion.r)
    rows = 0
    for _ in range(fusion.repeats):
        hooks.begin(i, None, latents.shape[0])
        e = dict(zip(fusion.rows, predict(model, scheduler, t, latents, fusion.rows, conds)))
        rows += len(fusion.rows) * latents.shape[0]
        e_tilde = guidance.epsilon(combine(e, fusion.weights), latents, a_t, scheduler.config.prediction_type)
        z = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        latents = guidance.fusion_update(latents, e_tilde, z, sigma, a_t, a_p)
    return latents, rows
