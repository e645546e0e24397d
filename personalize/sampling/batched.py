"""Many runs of one sampler setting in one denoising loop: the sweep's fast path.

`engine.run` samples the images of one prompt pair and one seed. A sweep asks for the
same sampler point on many prompts and seeds; their plans are equal (the plan depends on
the sampler configuration only), so every step's denoiser call can carry all of them at
once. Each item keeps what makes it itself: its own prompt conditioning, its own
generator (initial latents and ProFusion's fusion noise are drawn from it in the order
`engine.run` draws them), so an item's images do not depend on what shares its batch,
up to floating-point rounding of a larger matrix product.

Masked sampling and Photoswap locate the concept's token in the prompt; items whose
token sits at different positions go in separate loops.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from personalize.errors import UserError
from personalize.prompts import PromptPair
from personalize.sampling import guidance
from personalize.sampling.attention import AttentionHooks
from personalize.sampling.backbones import backbone, batch_conditioning
from personalize.sampling.engine import advance, check_profusion_scheduler, previous_alpha
from personalize.sampling.samplers import C, S, U, SamplerConfig, plan


@dataclass(frozen=True)
class Item:
    prompts: PromptPair
    seed: int


@dataclass
class ItemResult:
    images: list           # PIL images of this item
    rows: int              # denoiser rows evaluated for this item's images
    seconds: float         # this item's share of the loop's wall time


def run_many(pipe, items: list[Item], config: SamplerConfig, *, num_images: int = 1, height: int | None = None,
             width: int | None = None, negative_prompt: str = "", concept_phrase: str | None = None,
             decode: bool = True) -> list[ItemResult]:
    """The images of every item (`num_images` each), as `engine.run` would make them one
    item at a time, from as few denoiser calls as the plan allows."""
    if not items:
        return []
    model = backbone(pipe)
    steps = plan(config)
    needs_token = any(s.mask or s.swap for s in steps)
    if not needs_token:
        return _loop(pipe, model, steps, items, config, num_images, height, width, negative_prompt, None, decode)
    groups: dict[int | None, list[int]] = {}
    for k, item in enumerate(items):
        index = model.token_index(item.prompts.concept, concept_phrase) if concept_phrase else None
        if index is None and any(s.mask for s in steps):
            raise UserError("masked sampling needs the concept phrase to find its token in the prompt")
        groups.setdefault(index, []).append(k)
    out: list[ItemResult | None] = [None] * len(items)
    for index, members in groups.items():
        results = _loop(pipe, model, steps, [items[k] for k in members], config, num_images, height, width,
                        negative_prompt, index, decode)
        for k, r in zip(members, results):
            out[k] = r
    return out


def stack(conds: list[dict], rows: int) -> dict:
    """Per-item one-row conditionings, each repeated `rows` times, one block per item."""
    parts = [batch_conditioning([c], rows) for c in conds]
    return _cat(parts)


def _cat(parts: list[dict]) -> dict:
    out = {}
    for key, value in parts[0].items():
        if value is None:
            out[key] = None
        elif isinstance(value, dict):
            out[key] = _cat([p[key] for p in parts])
        else:
            out[key] = torch.cat([p[key] for p in parts])
    return out


def _loop(pipe, model, steps, items: list[Item], config: SamplerConfig, n: int, height, width,
          negative_prompt: str, token_index: int | None, decode: bool) -> list[ItemResult]:
    started = time.perf_counter()
    default_height, default_width = model.default_size()
    height, width = height or default_height, width or default_width
    model.check_size(height, width)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if any(s.fusion for s in steps):
        check_profusion_scheduler(scheduler)
    needs_mask = any(s.mask for s in steps)
    needs_swap = any(s.swap for s in steps)
    generators = [torch.Generator("cpu").manual_seed(item.seed) for item in items]
    total = n * len(items)

    with torch.inference_mode():
        # 1. Encode every prompt the plan uses, each text once
        used = [b for b in (U, C, S) if any(b in s.rows + (s.fusion.rows if s.fusion else ()) for s in steps)]
        encoded: dict[tuple[str, bool], dict] = {}

        def encode(text: str, negative: bool) -> dict:
            if (text, negative) not in encoded:
                encoded[(text, negative)] = model.encode(text, negative=negative, size=(height, width))
            return encoded[(text, negative)]

        texts = {U: lambda it: negative_prompt, C: lambda it: it.prompts.concept, S: lambda it: it.prompts.superclass}
        conds = {b: stack([encode(texts[b](it), b == U) for it in items], n) for b in used}

        # 2. Timesteps
        scheduler.set_timesteps(config.steps, device=model.device)
        timesteps = scheduler.timesteps
        extra_step_kwargs = pipe.prepare_extra_step_kwargs(generators[0], 0.0)
        output_index = model.step_output(len(timesteps))

        # 3. Latents: each item's from its own generator, as engine.run draws them
        dtype = conds[used[0]]["encoder_hidden_states"].dtype
        latents = torch.cat([model.prepare_latents(n, height, width, dtype, g) for g in generators])
        latents_s = latents.clone() if needs_swap else None
        scheduler_s = copy.deepcopy(scheduler) if needs_swap else None

        # 4. Denoising loop (engine.run's, over all items at once)
        rows = 0
        hooks = AttentionHooks(model.denoiser, capture=needs_mask, swap=needs_swap, token_index=token_index)
        with hooks:
            for i, t in enumerate(timesteps):
                step = steps[i]
                if step.fusion:
                    latents, fused = _fuse(model, scheduler, step, i, t, latents, conds, generators, n, hooks)
                    rows += fused
                if latents_s is not None and not step.swap:
                    latents_s = scheduler_s = None
                x = torch.cat([latents, latents, latents_s, latents_s]) if step.swap else None
                hooks.begin(i, step, total)
                e = _predict(model, scheduler, t, latents if x is None else x, step.rows, conds, repeat=x is None)
                rows += len(step.rows) * total
                if step.swap:  # rows [u, C | u, S]: the concept and the superclass trajectory
                    noise = _combine({U: e[0], C: e[1]}, step.weights)
                    latents_s = advance(scheduler_s, _combine({U: e[2], S: e[3]}, step.weights_s), t, latents_s,
                                        extra_step_kwargs, output_index)
                else:
                    named = dict(zip(step.rows, e))
                    noise = _combine(named, step.weights)
                    if step.mask:
                        attention = hooks.attention_map(latents.shape[-2:])
                        mask = guidance.quantile_mask(attention, step.mask.q)
                        noise = guidance.masked(noise, _combine(named, step.outside), mask)
                latents = advance(scheduler, noise, t, latents, extra_step_kwargs, output_index)

        # 5. Decode once, all items together
        images = model.decode(latents, generators[0]) if decode else [None] * total
    seconds = time.perf_counter() - started
    return [ItemResult(images[k * n:(k + 1) * n], rows // len(items), seconds / len(items))
            for k in range(len(items))]


def _combine(e: dict, weights: dict) -> torch.Tensor:
    """The plan's linear rule over predictions named by branch (`guidance.guide`)."""
    return guidance.guide(e.get(U), {b: (e[b], w) for b, w in weights.items()})


def _predict(model, scheduler, t, latents, rows, conds: dict, *, repeat: bool = True) -> list[torch.Tensor]:
    """`engine.predict` with per-item conditionings (already stacked per branch)."""
    x = torch.cat([latents] * len(rows)) if repeat else latents
    x = scheduler.scale_model_input(x, t)
    out = model(x, t, _cat([conds[b] for b in rows]))
    return list(out.chunk(len(rows)))


def _fuse(model, scheduler, step, i: int, t, latents, conds, generators, n: int, hooks):
    """`engine.fuse` with each item's fusion noise drawn from its own generator."""
    fusion = step.fusion
    a_t, a_p = float(scheduler.alphas_cumprod[int(t)]), previous_alpha(scheduler, i)
    sigma = guidance.fusion_sigma(a_t, a_p, fusion.r)
    rows = 0
    shape = (n, *latents.shape[1:])
    for _ in range(fusion.repeats):
        hooks.begin(i, None, latents.shape[0])
        e = dict(zip(fusion.rows, _predict(model, scheduler, t, latents, fusion.rows, conds)))
        rows += len(fusion.rows) * latents.shape[0]
        e_tilde = guidance.epsilon(_combine(e, fusion.weights), latents, a_t, scheduler.config.prediction_type)
        z = torch.cat([randn_tensor(shape, generator=g, device=latents.device, dtype=latents.dtype)
                       for g in generators])
        latents = guidance.fusion_update(latents, e_tilde, z, sigma, a_t, a_p)
    return latents, rows
