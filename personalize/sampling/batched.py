"""Many runs of one sampler setting in one denoising loop: the sweep's fast path.

`engine.run` samples the images of one prompt pair and one seed. A sweep asks for the
same sampler point on many prompts and seeds; their plans are equal (the plan depends on
the sampler configuration only), so they run as lanes of one `engine.denoise` loop, and
every step's denoiser call carries all of them at once.

Masked sampling and Photoswap locate the concept's token in the prompt; items whose
token sits at different positions go in separate loops.
"""

from __future__ import annotations

from dataclasses import dataclass

from personalize.prompts import PromptPair
from personalize.sampling.backbones import backbone
from personalize.sampling.engine import Lane, denoise
from personalize.sampling.samplers import SamplerConfig, plan, reaches_into_attention


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
             decode: bool = True, runtime: str = "torch") -> list[ItemResult]:
    """The images of every item (`num_images` each), as `engine.run` would make them one
    item at a time, from as few denoiser calls as the plan allows."""
    if not items:
        return []
    model = backbone(pipe)
    steps = plan(config)
    groups: dict[int | None, list[int]] = {}
    for k, item in enumerate(items):
        index = None
        if concept_phrase and reaches_into_attention(steps):
            index = model.token_index(item.prompts.concept, concept_phrase)
        groups.setdefault(index, []).append(k)
    out: list[ItemResult | None] = [None] * len(items)
    for index, members in groups.items():
        lanes = [Lane(items[k].prompts, items[k].seed, steps) for k in members]
        result = denoise(pipe, lanes, num_images=num_images, height=height, width=width,
                         negative_prompt=negative_prompt, token_index=index, decode=decode, runtime=runtime)
        n = num_images
        for j, k in enumerate(members):
            images = result.images[j * n:(j + 1) * n] if decode else [None] * n
            out[k] = ItemResult(images, result.rows[j], result.seconds / len(members))
    return out
