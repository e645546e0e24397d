"""The synthetic world: a renderer of one-object scenes and a judge that reads them back.

Only numpy, PIL (and scipy in the judge): importable without torch.
"""

from .judge import Verdict, fidelity, parse_prompt, read_image
from .scene import (
    CLASSES,
    COLOURS,
    CONCEPTS,
    CONTEXTS,
    SIZE,
    WORLD_PROMPTS,
    Scene,
    fill,
    random_caption,
    random_scene,
    reference_scenes,
    render,
    render_batch,
)

# `judge` (the function) is not re-exported: `personalize.world.judge` stays the module;
# use `from personalize.world.judge import judge`.

__all__ = [
    "CLASSES", "COLOURS", "CONCEPTS", "CONTEXTS", "SIZE", "WORLD_PROMPTS", "Scene", "fill", "random_caption",
    "random_scene", "reference_scenes", "render", "render_batch",
    "Verdict", "fidelity", "parse_prompt", "read_image",
]
