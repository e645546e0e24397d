"""The prompt sets of the study: the public DreamBooth benchmark (30 subjects, 25 prompts
for objects and 25 for live subjects) and the study's complex prompts (appendix H).

Templates use `{}` for the concept phrase, as everywhere in this package.
"""

from __future__ import annotations

from personalize.errors import UserError
from personalize.prompts import check_template

# The benchmark's subjects (folder name -> class noun), as listed in docs/evaluation.md.
LIVE_SUBJECTS = {
    "cat": "cat", "cat2": "cat", "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog",
    "dog6": "dog", "dog7": "dog", "dog8": "dog",
}
OBJECT_SUBJECTS = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal",
    "grey_sloth_plushie": "stuffed animal", "wolf_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "clock": "clock", "colorful_sneaker": "sneaker",
    "shiny_sneaker": "sneaker", "duck_toy": "toy", "monster_toy": "toy", "poop_emoji": "toy",
    "rc_car": "toy", "robot_toy": "toy", "fancy_boot": "boot", "pink_sunglasses": "glasses",
    "red_cartoon": "cartoon", "teapot": "teapot", "vase": "vase",
}
SUBJECTS = {**LIVE_SUBJECTS, **OBJECT_SUBJECTS}
LIVE_CLASSES = frozenset(LIVE_SUBJECTS.values())

_BOTH_FIRST = [
    "a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
    "a {} on top of pink fabric", "a {} on top of a wooden floor", "a {} with a city in the background",
    "a {} with a mountain in the background", "a {} with a blue house in the background",
    "a {} on top of a purple rug in a forest",
]
_BOTH_LAST = ["a red {}", "a purple {}", "a shiny {}", "a wet {}", "a cube shaped {}"]

DREAMBENCH_OBJECT = _BOTH_FIRST + [
    "a {} with a wheat field in the background", "a {} with a tree and autumn leaves in the background",
    "a {} with the Eiffel Tower in the background", "a {} floating on top of water",
    "a {} floating in an ocean of milk", "a {} on top of green grass with sunflowers around it",
    "a {} on top of a mirror", "a {} on top of the sidewalk in a crowded street", "a {} on top of a dirt road",
    "a {} on top of a white rug",
] + _BOTH_LAST

DREAMBENCH_LIVE = _BOTH_FIRST + [
    "a {} wearing a red hat", "a {} wearing a santa hat", "a {} wearing a rainbow scarf",
    "a {} wearing a black top hat and a monocle", "a {} in a chef outfit", "a {} in a firefighter outfit",
    "a {} in a police outfit", "a {} wearing pink glasses", "a {} wearing a yellow shirt",
    "a {} in a purple wizard outfit",
] + _BOTH_LAST

# Appendix H of the study (arXiv:2502.05895), word for word (its `V*` written as `{}`). The text is kept as
# printed, misspellings included ("chief outfit", "contonish", "smowy", ...): TS depends
# on the exact words, and the printed text is the only record of what the study used.
# The printed object list stops after 8 of its 10 prompts; those 8 are all there is.
COMPLEX_LIVE = [
    "{} in a chief outfit in a nostalgic kitchen filled with vintage furniture and scattered biscuit",
    "{} sitting on a windowsill in Tokyo at dusk, illuminated by neon city lights, using neon color palette",
    "a vintage-style illustration of a {} sitting on a cobblestone street in Paris during a rainy evening, "
    "showcasing muted tones and soft grays",
    "an anime drawing of a {} dressed in a superhero cape, soaring through the skies above a bustling city "
    "during a sunset",
    "a contonish illustration of a {} of resead as a ballerina performing on a stage in the spotlight",
    "oil painting of a {} in Seattle during a snowy full moon night",
    "a diatal painting of a {} in seattle during a smowy full moon sight",
    "a drawing of a {} wearing a space helmet, floating among stars in a cosmic landscape during a starry night",
    "a {} in a detective outfit in a foggy London street during a rainy evening, using muted grays and blues",
    "a {} wearing a pirate hat exploring a sandy beach at the sunset with a boat floating in the background",
]
COMPLEX_OBJECT = [
    "a digital illustration of a {} on a windowsill in Tokyo at dusk, illuminated by neon city lights, "
    "using neon color palette",
    "a sketch of a {} on a sofa in a cozy living room, rendered in warm tones",
    "a watercolor painting of a {} on a wooden table in a sunny backyard, surrounded by flowers and butterflies",
    "a vertex of a distinct of a giant {} surrounded by floating clouds during a starry night, where the "
    "moonlight creates an ethereal glow",
    "oil painting of a {} in Seattle during a snowy full moon night",
    "a darwing of a {} floating among stars in a cosmic landscape during a starry night with a spacecraft "
    "in the background",
    "a {} floaten gashed beach next to the sand castle at the sunset with a floaing boat in the background",
    "a a vintage-style illustration of a {} on a cobblestone street in Paris during a rainy evening, "
    "showcasing muted tones and soft grays",
]

# The world's prompts (docs/world.md): its nine context prompts and six colour prompts,
# standing in for the benchmark's object prompts.
WORLD = [
    "a {} in the jungle", "a {} in the snow", "a {} on the beach", "a {} on a cobblestone street",
    "a {} on top of pink fabric", "a {} on top of a wooden floor", "a {} with a city in the background",
    "a {} with a mountain in the background", "a {} with a blue house in the background",
    "a red {}", "a orange {}", "a yellow {}", "a green {}", "a blue {}", "a purple {}",
]

PROMPT_SETS: dict[str, list[str]] = {
    "world": WORLD,
    "dreambench-object": DREAMBENCH_OBJECT,
    "dreambench-live": DREAMBENCH_LIVE,
    "complex-object": COMPLEX_OBJECT,
    "complex-live": COMPLEX_LIVE,
}
# Names that pick the live or the object set per concept, as the benchmark does.
AUTO_SETS = {"dreambench": ("dreambench-live", "dreambench-object"), "complex": ("complex-live", "complex-object")}
SET_NAMES = tuple(PROMPT_SETS) + tuple(AUTO_SETS)


def is_live(name: str, superclass: str) -> bool:
    """Whether a concept takes the benchmark's live-subject prompts: a live subject of the
    benchmark, or any concept whose class noun is a live class (cat, dog)."""
    return name in LIVE_SUBJECTS or superclass.strip().lower() in LIVE_CLASSES


def resolve_prompts(value, *, name: str, superclass: str, where: str = "prompts") -> list[str]:
    """The prompt templates a `prompts:` value stands for, for the concept `name`: a set
    name, or a list of templates (each with a placeholder)."""
    if isinstance(value, str):
        if value in AUTO_SETS:
            live, obj = AUTO_SETS[value]
            return list(PROMPT_SETS[live if is_live(name, superclass) else obj])
        if value in PROMPT_SETS:
            return list(PROMPT_SETS[value])
        raise UserError(f"{where}: unknown prompt set {value!r}; accepted: {' | '.join(SET_NAMES)} "
                        "or a list of templates")
    if not isinstance(value, list):
        raise UserError(f"{where}: {value!r} is neither a prompt set name nor a list of templates")
    if not value:
        raise UserError(f"{where}: the list of prompt templates is empty")
    for k, template in enumerate(value):
        if not isinstance(template, str):
            raise UserError(f"{where}[{k}]: {template!r} is not a text")
        if "\n" in template or "\r" in template:
            raise UserError(f"{where}[{k}]: a template must be one line")
        try:
            check_template(template)
        except UserError as e:
            raise UserError(f"{where}[{k}]: {e}") from None
    return list(value)
