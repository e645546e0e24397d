"""The one denoising loop that runs every sampler of the study.

It follows a sampler's per-step plan (`samplers.plan`): each step evaluates only the
rows the plan names, all in one batched denoiser call, and combines them with the
pure rules of `guidance.py`. Attention work (mask maps, Photoswap) happens in the
processors of `attention.py`, which the loop tells the step index explicitly. What
differs between pipeline families (SD, SD-XL, PixArt-alpha) is in `backbones.py`.

The loop (`denoise`) runs several lanes at once: a lane is a prompt pair, a seed and a
plan. `run` is one lane; a sweep runs one plan over many prompts and seeds
(`batched.run_many`); the live instrument runs several linear plans of one prompt and
seed (`live.run_points`). Each lane draws its initial latents and ProFusion's fusion
noise from its own generator, in the order a lone run draws them, so a lane's images do
not depend on what shares its batch, up to floating-point rounding of a larger matrix
product.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from personalize.errors import UserError
from personalize.prompts import PromptPair
from personalize.sampling import guidance
from personalize.sampling.attention import AttentionHooks
from personalize.sampling.backbones import Backbone, Conditioning, backbone, batch_conditioning
from personalize.sampling.runtime import denoiser_runner
from personalize.sampling.samplers import ROW_ORDER, C, S, SamplerConfig, Step, U, plan, reaches_into_attention


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
    runtime: str = "torch"           # where the denoiser ran: "torch" or "onnx"


StepCallback = Callable[[dict], None]


@dataclass(frozen=True)
class Lane:
    """Images the loop makes from one prompt pair, one seed and one plan."""
    prompts: PromptPair
    seed: int
    steps: Sequence[Step]


def run(pipe, prompts: PromptPair, config: SamplerConfig, *, seed: int = 0, num_images: int = 1,
        height: int | None = None, width: int | None = None, negative_prompt: str = "",
        concept_phrase: str | None = None, callback: StepCallback | None = None,
        stop=None, decode: bool = True, runtime: str = "torch") -> RunResult:
    """Sample `num_images` images of `prompts` with the sampler `config` on a diffusers
    pipeline `pipe` of a supported family (SD 1.x/2.x, SD-XL, PixArt-alpha; see
    `backbones.py`), from its components only: its own loop is not used.

    `callback` receives after every step a dict of named tensors: `step`, `timestep`,
    `latents` (after the step), `noise_pred` (the guided prediction), `predictions`
    (branch name -> prediction) and, for masked sampling, `attention` and `mask`.
    `stop` is anything with `is_set()`; once set, the run raises `Stopped` at its next step.
    `runtime` says where the denoiser runs (`runtime.RUNTIMES`; masked sampling and
    Photoswap always in PyTorch).
    """
    if num_images < 1:
        raise UserError(f"--num-images: {num_images} must be at least 1")
    model = backbone(pipe)
    steps = plan(config)
    token_index = None
    if reaches_into_attention(steps):
        token_index = model.token_index(prompts.concept, concept_phrase) if concept_phrase else None
    result = denoise(pipe, [Lane(prompts, seed, steps)], num_images=num_images, height=height, width=width,
                     negative_prompt=negative_prompt, token_index=token_index, callback=callback, stop=stop,
                     decode=decode, runtime=runtime)
    return RunResult(result.images, result.latents, result.rows[0], result.seconds, token_index,
                     result.step_rows[0], result.size, result.runtime)


@dataclass
class LoopResult:
    images: list                     # num_images per lane, lane after lane
    latents: torch.Tensor
    rows: list[int]                  # denoiser rows per lane, its images together
    step_rows: list[list[int]]       # per lane, per step
    seconds: float                   # the whole loop
    size: tuple[int, int]
    runtime: str = "torch"


def denoise(pipe, lanes: list[Lane], *, num_images: int = 1, height: int | None = None,
            width: int | None = None, negative_prompt: str = "", token_index: int | None = None,
            callback: StepCallback | None = None, stop=None, decode: bool = True,
            runtime: str = "torch") -> LoopResult:
    """The denoising loop over `lanes`, `num_images` images each, in one batched denoiser
    call per step. The lanes share one plan, or their plans are all linear (no mask,
    fusion or swap); then each step evaluates the union of the lanes' rows once and
    combines them per lane. Masked sampling and Photoswap need the concept token's
    position, `token_index`, the same in every lane."""
    started = time.perf_counter()
    model = backbone(pipe)
    n, first = num_images, lanes[0].steps
    shared = all(list(lane.steps) == list(first) for lane in lanes)
    everything = [s for lane in lanes for s in lane.steps]
    if len({len(lane.steps) for lane in lanes}) != 1:
        raise UserError("the plans run together must have the same number of steps")
    if not shared and any(s.mask or s.fusion or s.swap for s in everything):
        raise UserError("masked, ProFusion and Photoswap plans run together only with the same plan")
    # 1. Check inputs
    default_height, default_width = model.default_size()
    height, width = height or default_height, width or default_width
    model.check_size(height, width)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # a fresh state for each run
    if any(s.fusion for s in everything):
        check_profusion_scheduler(scheduler)
    needs_mask = any(s.mask for s in everything)
    needs_swap = any(s.swap for s in everything)
    if needs_mask and token_index is None:
        raise UserError("masked sampling needs the concept phrase to find its token in the prompt")
    generators = [torch.Generator("cpu").manual_seed(lane.seed) for lane in lanes]
    total = n * len(lanes)

    with torch.inference_mode():
        # 2. Encode the prompts the plans use, each text once
        used = [b for b in ROW_ORDER if any(b in s.rows + (s.fusion.rows if s.fusion else ()) for s in everything)]
        texts = {U: lambda lane: negative_prompt, C: lambda lane: lane.prompts.concept,
                 S: lambda lane: lane.prompts.superclass}
        encoded: dict[tuple[str, bool], Conditioning] = {}

        def encode(text: str, negative: bool) -> Conditioning:
            if (text, negative) not in encoded:
                encoded[(text, negative)] = model.encode(text, negative=negative, size=(height, width))
            return encoded[(text, negative)]

        conds = {b: batch_conditioning([encode(texts[b](lane), b == U) for lane in lanes], n) for b in used}

        # 3. Prepare timesteps
        scheduler.set_timesteps(len(first), device=model.device)
        timesteps = scheduler.timesteps
        extra_step_kwargs = pipe.prepare_extra_step_kwargs(generators[0], 0.0)
        output_index = model.step_output(len(timesteps))

        # 4. Prepare latents exactly as diffusers' pipeline draws them, each lane from its generator
        dtype = conds[used[0]]["encoder_hidden_states"].dtype
        latents = torch.cat([model.prepare_latents(n, height, width, dtype, g) for g in generators])
        # Photoswap's superclass trajectory, with its own scheduler state (multistep schedulers
        # keep a history per trajectory)
        latents_s = latents.clone() if needs_swap else None
        scheduler_s = copy.deepcopy(scheduler) if needs_swap else None
        # Attention processors are Python: a plan that reaches into attention runs in PyTorch.
        if not (needs_mask or needs_swap):
            model.runner = denoiser_runner(runtime, model.family, model.denoiser, latents.shape[-2:])

        # 5. Denoising loop
        rows, step_rows = [0] * len(lanes), [[] for _ in lanes]
        hooks = AttentionHooks(model.denoiser, capture=needs_mask, swap=needs_swap, token_index=token_index)
        with hooks:
            for i, t in enumerate(timesteps):
                if stop is not None and stop.is_set():
                    raise Stopped(f"stopped at step {i} of {len(timesteps)}")
                step, per_lane = first[i], [lane.steps[i] for lane in lanes]
                if step.fusion:
                    latents = fuse(model, scheduler, step, i, t, latents, conds, generators, n, hooks)
                if latents_s is not None and not step.swap:
                    latents_s = scheduler_s = None  # the superclass trajectory is no longer read
                hooks.begin(i, step, total)
                attention = mask = None
                if step.swap:
                    e, noise, noise_s = swap_step(model, scheduler, t, step, latents, latents_s, conds)
                    latents_s = advance(scheduler_s, noise_s, t, latents_s, extra_step_kwargs, output_index)
                    named = dict(zip(step.rows, e))
                else:
                    union = step.rows if shared else tuple(b for b in ROW_ORDER if any(b in s.rows for s in per_lane))
                    named = dict(zip(union, predict(model, scheduler, t, latents, union, conds)))
                    if shared:
                        noise = combine(named, step.weights)
                    else:
                        noise = torch.cat([combine({b: named[b][k * n:(k + 1) * n] for b in s.rows}, s.weights)
                                           for k, s in enumerate(per_lane)])
                    if step.mask:
                        attention = hooks.attention_map(latents.shape[-2:])
                        mask = guidance.quantile_mask(attention, step.mask.q)
                        noise = guidance.masked(noise, combine(named, step.outside), mask)
                latents = advance(scheduler, noise, t, latents, extra_step_kwargs, output_index)
                for k, s in enumerate(per_lane):
                    rows[k] += s.cost * n
                    step_rows[k].append(s.cost * n)
                if callback is not None:
                    callback({"step": i, "timestep": t, "latents": latents, "noise_pred": noise,
                              "predictions": named, "attention": attention, "mask": mask, "rows": step.rows})

        # 6. Decode, all lanes together
        images = model.decode(latents, generators[0]) if decode else []
    return LoopResult(images, latents, rows, step_rows, time.perf_counter() - started, (height, width),
                      "torch" if model.runner is None else "onnx")


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
    group. `conds` holds each branch's conditioning with one row per latent. With
    `repeat`, `latents` are shared by all row groups; otherwise `latents` already holds
    one block per row group."""
    x = torch.cat([latents] * len(rows)) if repeat else latents
    x = scheduler.scale_model_input(x, t)
    out = model(x, t, concat_conditioning([conds[b] for b in rows]))
    return list(out.chunk(len(rows)))


def concat_conditioning(parts: list[Conditioning]) -> Conditioning:
    """Conditionings of several row groups, one after the other along the batch."""
    out = {}
    for key, value in parts[0].items():
        if value is None:
            out[key] = None
        elif isinstance(value, dict):
            out[key] = concat_conditioning([p[key] for p in parts])
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


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


def fuse(model: Backbone, scheduler, step: Step, i: int, t, latents, conds, generators, n: int,
         hooks) -> torch.Tensor:
    """ProFusion's fusion step (see `guidance.fusion_update`), each lane's noise drawn from
    its own generator (`n` images per lane); returns the new latents."""
    fusion = step.fusion
    a_t, a_p = float(scheduler.alphas_cumprod[int(t)]), previous_alpha(scheduler, i)
    sigma = guidance.fusion_sigma(a_t, a_p, fusion.r)
    shape = (n, *latents.shape[1:])
    for _ in range(fusion.repeats):
        hooks.begin(i, None, latents.shape[0])
        e = dict(zip(fusion.rows, predict(model, scheduler, t, latents, fusion.rows, conds)))
        e_tilde = guidance.epsilon(combine(e, fusion.weights), latents, a_t, scheduler.config.prediction_type)
        z = torch.cat([randn_tensor(shape, generator=g, device=latents.device, dtype=latents.dtype)
                       for g in generators])
        latents = guidance.fusion_update(latents, e_tilde, z, sigma, a_t, a_p)
    return latents
