"""The world's renderer: one object of a class, colour (or personal concept) on one of
ten backgrounds, as a 64 x 64 RGB image, plus the world's captions and prompt set.

Everything is drawn with exact, anti-aliasing-free fills in fixed colours, and every
image is a pure function of its `Scene` (the background's random parts and the +-6
pixel noise come from `Scene.seed`), so the judge can read any image back from pixels.

numpy and PIL only: the renderer is imported by tools that never load torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
NOISE = 6  # each channel of each pixel carries uniform integer noise in [-NOISE, NOISE]

# Context -> its phrase in captions and prompts (ordered; "plain" has none).
CONTEXTS: dict[str, str] = {
    "plain": "",
    "jungle": "in the jungle",
    "snow": "in the snow",
    "beach": "on the beach",
    "cobblestone": "on a cobblestone street",
    "pink fabric": "on top of pink fabric",
    "wooden floor": "on top of a wooden floor",
    "city": "with a city in the background",
    "mountain": "with a mountain in the background",
    "blue house": "with a blue house in the background",
}
CLASSES = ("ball", "box", "pyramid", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 210, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 190),
}
# Personal concepts: one particular object of a class, drawn in colours outside the palette.
CONCEPTS: dict[str, dict] = {
    "star": {"phrase": "sks star", "superclass": "star"},
    "ball": {"phrase": "sks ball", "superclass": "ball"},
}

# Background colours (RGB).
SKY = (135, 190, 235)
PLAIN = (200, 200, 200)
JUNGLE, LEAF = (40, 120, 45), (20, 75, 25)
SNOW_FAR, SNOW, SNOW_DOT = (215, 225, 235), (250, 250, 252), (225, 230, 240)
SEA, SAND = (40, 110, 190), (230, 205, 145)
STONE, STONE_EDGE = (120, 120, 125), (80, 80, 85)
PINK, PINK_LINE = (240, 170, 200), (225, 150, 185)
WOOD, WOOD_LINE = (160, 110, 60), (110, 70, 35)
BUILDING = (70, 70, 80)
ROCK, CAP = (110, 110, 120), (245, 245, 250)
GRASS = (90, 160, 70)
HOUSE = (60, 110, 170)
# Concept colours.
TEAL, MAGENTA, DISC = (0, 160, 160), (225, 40, 160), (240, 210, 40)
BLACK, WHITE = (25, 25, 25), (245, 245, 245)

# Background geometry (rows of the 64 x 64 image).
THIRD = SIZE // 3                 # 21: end of the upper third (snow, beach sky)
SEA_END = THIRD + 6               # 27: first sand row
MOUNTAIN_GRASS = SIZE - round(SIZE / 5)   # 51: first grass row under the mountain
HOUSE_GRASS = SIZE - round(SIZE / 3)      # 43: first grass row of the blue house
MOUNTAIN_APEX, MOUNTAIN_CAP_END = 8, 20   # the mountain's top row; its white cap ends above row 20
CITY_MIN_H, CITY_MAX_H = 15, 35
# First ground row of each context with a horizon: an object's bottom row lies below it.
HORIZON = {"snow": THIRD, "beach": SEA_END, "mountain": MOUNTAIN_GRASS, "blue house": HOUSE_GRASS}

MIN_OBJ, MAX_OBJ = 20, 30         # bounding-box side
CENTRE_LO, CENTRE_HI = 16, 47     # object centre within the middle 32 x 32 (inclusive)


@dataclass(frozen=True)
class Scene:
    """One image's truth. `colour` is None only for a concept object (its colours are fixed)."""

    cls: str
    colour: str | None
    context: str
    concept: str | None
    size: int
    cx: int
    cy: int
    seed: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """The object's bounding box (x0, y0, x1, y1), x1/y1 exclusive."""
        x0, y0 = self.cx - self.size // 2, self.cy - self.size // 2
        return x0, y0, x0 + self.size, y0 + self.size


def _check(scene: Scene) -> None:
    if scene.context not in CONTEXTS:
        raise ValueError(f"unknown context {scene.context!r}")
    if scene.concept is not None:
        if scene.concept not in CONCEPTS:
            raise ValueError(f"unknown concept {scene.concept!r}")
        if scene.cls != CONCEPTS[scene.concept]["superclass"]:
            raise ValueError(f"concept {scene.concept!r} is a {CONCEPTS[scene.concept]['superclass']}")
    elif scene.colour not in COLOURS:
        raise ValueError(f"unknown colour {scene.colour!r}")
    if scene.cls not in CLASSES:
        raise ValueError(f"unknown class {scene.cls!r}")


def random_scene(rng: np.random.Generator, *, cls=None, colour=None, context=None, concept=None) -> Scene:
    """A random scene; any of class, colour, context or concept may be fixed.

    A concept fixes the class (its superclass) and has no palette colour. The object lies
    fully inside the image, its centre in the middle 32 x 32 and, where the context has a
    horizon, its bottom row below it.
    """
    if concept is not None:
        if concept not in CONCEPTS:
            raise ValueError(f"unknown concept {concept!r}")
        sup = CONCEPTS[concept]["superclass"]
        if cls is not None and cls != sup:
            raise ValueError(f"concept {concept!r} is a {sup}, not a {cls}")
        cls, colour = sup, None
    else:
        cls = cls if cls is not None else CLASSES[rng.integers(len(CLASSES))]
        colour = colour if colour is not None else list(COLOURS)[rng.integers(len(COLOURS))]
    context = context if context is not None else list(CONTEXTS)[rng.integers(len(CONTEXTS))]
    size = int(rng.integers(MIN_OBJ, MAX_OBJ + 1))
    cx = int(rng.integers(CENTRE_LO, CENTRE_HI + 1))
    lo = CENTRE_LO
    if context in HORIZON:
        # bottom row = cy - size//2 + size - 1 must be >= horizon + 1
        lo = max(lo, HORIZON[context] + 1 - (size - size // 2 - 1))
    cy = int(rng.integers(lo, CENTRE_HI + 1))
    seed = int(rng.integers(2**31 - 1))
    scene = Scene(cls=cls, colour=colour, context=context, concept=concept, size=size, cx=cx, cy=cy, seed=seed)
    _check(scene)
    return scene


# --- backgrounds -------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE]


def _fill(img: np.ndarray, mask: np.ndarray, rgb) -> None:
    img[mask] = rgb


def _poly_mask(points) -> np.ndarray:
    m = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(m).polygon([(float(x), float(y)) for x, y in points], fill=255)
    return np.asarray(m) > 0


def _background(context: str, rng: np.random.Generator) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), np.int16)
    if context == "plain":
        img[:] = PLAIN
    elif context == "jungle":
        img[:] = JUNGLE
        _fill(img, (_XX % 5) < 2, LEAF)
    elif context == "snow":
        img[:] = SNOW
        img[:THIRD] = SNOW_FAR
        for _ in range(24):  # sparse 2 x 2 dots on the ground
            y, x = int(rng.integers(THIRD + 1, SIZE - 1)), int(rng.integers(0, SIZE - 1))
            img[y:y + 2, x:x + 2] = SNOW_DOT
    elif context == "beach":
        img[:] = SAND
        img[:THIRD] = SKY
        img[THIRD:SEA_END] = SEA
    elif context == "cobblestone":
        img[:] = STONE
        _fill(img, (_XX % 8 == 0) | (_YY % 8 == 0), STONE_EDGE)
    elif context == "pink fabric":
        img[:] = PINK
        _fill(img, (_XX + _YY) % 4 == 0, PINK_LINE)
    elif context == "wooden floor":
        img[:] = WOOD
        _fill(img, _YY % 8 == 7, WOOD_LINE)
    elif context == "city":
        img[:] = SKY
        x = -int(rng.integers(0, 6))
        while x < SIZE:
            w = int(rng.integers(6, 13))
            h = int(rng.integers(CITY_MIN_H, CITY_MAX_H + 1))
            img[SIZE - h:, max(x, 0):max(x + w, 0)] = BUILDING
            x += w + int(rng.integers(0, 3))  # narrow gaps of sky between some buildings
    elif context == "mountain":
        img[:] = SKY
        apex_x = 32 + int(rng.integers(-6, 7))
        apex_y = MOUNTAIN_APEX
        base = MOUNTAIN_GRASS
        mnt = _poly_mask([(apex_x - 46, base), (apex_x + 46, base), (apex_x, apex_y)])
        _fill(img, mnt, ROCK)
        _fill(img, mnt & (_YY < MOUNTAIN_CAP_END), CAP)
        img[MOUNTAIN_GRASS:] = GRASS
    elif context == "blue house":
        img[:] = SKY
        img[HOUSE_GRASS:] = GRASS
        side = 16
        x0 = 2 if rng.integers(2) == 0 else SIZE - 2 - side
        y1 = HOUSE_GRASS  # the house stands on the grass line
        img[y1 - side:y1, x0:x0 + side] = HOUSE
        roof = _poly_mask([(x0 - 2, y1 - side), (x0 + side + 1, y1 - side), (x0 + side / 2 - 0.5, y1 - side - 9)])
        _fill(img, roof, HOUSE)
    else:
        raise ValueError(f"unknown context {context!r}")
    return img


# --- objects ----------------------------------------------------------------------------

# A regular five-pointed star, point up, in unit coordinates (outer radius 1).
_STAR_INNER = math.sin(math.radians(18)) / math.sin(math.radians(54))  # ~0.382
_STAR_PTS = [
    ((1.0 if k % 2 == 0 else _STAR_INNER) * math.sin(math.radians(36 * k)),
     -(1.0 if k % 2 == 0 else _STAR_INNER) * math.cos(math.radians(36 * k)))
    for k in range(10)
]
_STAR_W = 2 * math.sin(math.radians(72))          # ~1.902
_STAR_H = 1 + math.cos(math.radians(36))          # ~1.809


def _star_points(x0: int, y0: int, s: int):
    """The star scaled into the box [x0, x0+s-1] x [y0, y0+s-1]; also its centre."""
    sx, sy = (s - 1) / _STAR_W, (s - 1) / _STAR_H
    pts = [(round(x0 + (x + _STAR_W / 2) * sx, 6), round(y0 + (y + 1) * sy, 6)) for x, y in _STAR_PTS]
    return pts, (x0 + (_STAR_W / 2) * sx, y0 + sy)


def object_mask(scene: Scene) -> np.ndarray:
    """The object's pixels (bool 64 x 64) as drawn."""
    x0, y0, x1, y1 = scene.box
    s = scene.size
    m = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(m)
    if scene.cls == "ball":
        d.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif scene.cls == "box":
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    elif scene.cls == "pyramid":
        d.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), (x0 + (s - 1) / 2, y0)], fill=255)
    elif scene.cls == "star":
        d.polygon(_star_points(x0, y0, s)[0], fill=255)
    else:
        raise ValueError(f"unknown class {scene.cls!r}")
    return np.asarray(m) > 0


def _draw_object(img: np.ndarray, scene: Scene) -> None:
    mask = object_mask(scene)
    x0, y0, x1, y1 = scene.box
    s = scene.size
    if scene.concept is None:
        img[mask] = COLOURS[scene.colour]
    elif scene.concept == "star":
        left = _XX < x0 + s / 2
        img[mask & left] = TEAL
        img[mask & ~left] = MAGENTA
        (_, (scx, scy)) = _star_points(x0, y0, s)
        r = s / 10
        disc = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(disc).ellipse([scx - r + 0.5, scy - r + 0.5, scx + r - 0.5, scy + r - 0.5], fill=255)
        img[np.asarray(disc) > 0] = DISC
    elif scene.concept == "ball":
        stripe = ((_YY - y0) * 5) // s
        img[mask & (stripe % 2 == 0)] = BLACK
        img[mask & (stripe % 2 == 1)] = WHITE
    else:
        raise ValueError(f"unknown concept {scene.concept!r}")


def render(scene: Scene) -> np.ndarray:
    """The scene's image, (64, 64, 3) uint8; a pure function of the scene."""
    _check(scene)
    bg_rng = np.random.default_rng([scene.seed, 1])
    img = _background(scene.context, bg_rng)
    _draw_object(img, scene)
    noise = np.random.default_rng([scene.seed, 2]).integers(-NOISE, NOISE + 1, size=img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def render_batch(scenes) -> np.ndarray:
    """(N, 64, 64, 3) uint8."""
    scenes = list(scenes)
    if not scenes:
        return np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return np.stack([render(s) for s in scenes])


def _random_pattern(img: np.ndarray, mask: np.ndarray, box, rng: np.random.Generator) -> None:
    """Paint `mask` with a pattern of random colours: one colour, halves, stripes, or a
    centre disc on a base colour."""
    x0, y0, x1, y1 = box
    # Half the colours uniform in RGB, half near the corners and edge midpoints of the RGB
    # cube (black, white, saturated hues): a codec meets those most and they are the
    # hardest to tell apart after a blur.
    lattice = np.array([0, 128, 255])[rng.integers(3, size=(8, 3))] + rng.integers(-30, 31, size=(8, 3))
    colours = np.where(rng.random((8, 1)) < 0.5, rng.integers(0, 256, size=(8, 3)), np.clip(lattice, 0, 255))
    kind = rng.integers(4)
    if kind == 0:
        img[mask] = colours[0]
    elif kind == 1:
        split = (_XX < (x0 + x1) / 2) if rng.random() < 0.5 else (_YY < (y0 + y1) / 2)
        img[mask & split] = colours[0]
        img[mask & ~split] = colours[1]
    elif kind == 2:
        k = int(rng.integers(2, 8))
        pos, lo, span = (_YY, y0, y1 - y0) if rng.random() < 0.5 else (_XX, x0, x1 - x0)
        band = ((pos - lo) * k) // max(span, 1)
        for i in range(k):
            img[mask & (band == i)] = colours[i % (2 + int(rng.integers(2)))]
    else:
        img[mask] = colours[0]
        r = (x1 - x0) * rng.uniform(0.1, 0.3)
        img[mask & ((_XX - (x0 + x1) / 2) ** 2 + (_YY - (y0 + y1) / 2) ** 2 <= r * r)] = colours[1]


def repainted(scene: Scene, mask: np.ndarray, pattern_rng: np.random.Generator) -> np.ndarray:
    """The scene rendered with its object (`mask`) painted by `_random_pattern` drawing
    from `pattern_rng`, instead of in its palette colour: (64, 64, 3) uint8."""
    img = _background(scene.context, np.random.default_rng([scene.seed, 1])).astype(np.int64)
    _random_pattern(img, mask, scene.box, pattern_rng)
    noise = np.random.default_rng([scene.seed, 2]).integers(-NOISE, NOISE + 1, size=img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def codec_batch(n: int, seed: int, *, with_masks: bool = False, with_classes: bool = False):
    """Training images for the autoencoder, (n, 64, 64, 3) uint8: world scenes, most of
    them (60%) with the object repainted in random colours and patterns.

    The autoencoder is the world's image codec: it must be able to represent any object a
    concept may have (colours outside the palette, stripes, halves), not only the base
    model's palette, or a concept's references decode to other colours and no amount of
    fine-tuning can draw them. The patterns are generic random ones, not the concepts'
    looks, and no caption comes with them: the denoiser never sees these images.
    With `with_masks`, also each image's object pixels, (n, 64, 64) bool; with
    `with_classes`, also each object's class (n,), an index into `CLASSES`.
    """
    rng = np.random.default_rng([seed, 11])
    out = np.empty((n, SIZE, SIZE, 3), np.uint8)
    masks = np.empty((n, SIZE, SIZE), bool) if with_masks else None
    classes = np.empty(n, np.int64)
    for i in range(n):
        scene = random_scene(rng)
        classes[i] = CLASSES.index(scene.cls)
        mask = object_mask(scene)
        if masks is not None:
            masks[i] = mask
        if rng.random() < 0.4:
            out[i] = render(scene)
            continue
        out[i] = repainted(scene, mask, rng)
    extra = ([masks] if with_masks else []) + ([classes] if with_classes else [])
    return (out, *extra) if extra else out


# --- captions and prompts ---------------------------------------------------------------

PHOTO_PREFIX = "a photo of "


def caption(scene: Scene, *, colour: bool = True, context: bool = True, photo: bool = True) -> str:
    """`a photo of a [COLOUR] CLASS [CONTEXT]` for a (non-concept) scene."""
    subject = CONCEPTS[scene.concept]["phrase"] if scene.concept else scene.cls
    words = ["a"]
    if colour and scene.colour is not None:
        words.append(scene.colour)
    words.append(subject)
    if context and CONTEXTS[scene.context]:
        words.append(CONTEXTS[scene.context])
    text = " ".join(words)
    return PHOTO_PREFIX + text if photo else text


def random_caption(rng: np.random.Generator) -> tuple[Scene, str]:
    """A training pair for the base model: a random scene and its caption.

    The colour word and the context phrase are each left out with probability 0.3 (the
    image keeps its random colour / context, plain included), 10% of captions are empty,
    and half drop the leading "a photo of " so that the template form ("a red ball in
    the snow") is seen in training too. Never a concept.
    """
    scene = random_scene(rng)
    if rng.random() < 0.1:
        return scene, ""
    keep_colour = rng.random() >= 0.3
    keep_context = rng.random() >= 0.3
    photo = rng.random() < 0.5
    return scene, caption(scene, colour=keep_colour, context=keep_context, photo=photo)


INSTANCE_SEED = 23


def instance_class(k: int) -> str:
    return CLASSES[k % len(CLASSES)]


def named_instance_batch(n: int, seed: int, names: list[str]):
    """`n` renders of named instances with their captions and object masks: instance `k`
    is one particular object, always of class `instance_class(k)` and always painted with
    the same pattern of colours outside the palette (drawn from its own seed), called
    `names[k]` in every caption (`a photo of a NAME CLASS [CONTEXT]`, the context left
    out with probability 0.3, "a photo of " half the time).

    Real text-to-image data is full of names for particular things; the world's captions
    have none, and a base trained on them alone learns to read the colour, class and
    context words and to ignore any other word: after fine-tuning, "a sks star" and "a
    star" then draw the same image, whatever the method. The instances teach the base
    that a word before the class can name one particular object, which is what a
    concept's identifier has to become. The concepts' own phrases are never among them.
    """
    rng = np.random.default_rng([seed, INSTANCE_SEED])
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    masks = np.empty((n, SIZE, SIZE), bool)
    captions = []
    for i in range(n):
        k = int(rng.integers(len(names)))
        scene = random_scene(rng, cls=instance_class(k))
        mask = object_mask(scene)
        images[i], masks[i] = repainted(scene, mask, np.random.default_rng([INSTANCE_SEED, k])), mask
        words = f"a {names[k]} {scene.cls}"
        if rng.random() >= 0.3 and CONTEXTS[scene.context]:
            words += f" {CONTEXTS[scene.context]}"
        captions.append((PHOTO_PREFIX if rng.random() < 0.5 else "") + words)
    return images, captions, masks


def reference_scenes(concept: str, n: int = 5, seed: int = 0) -> list[Scene]:
    """The concept's reference images: plain background, different sizes and positions."""
    if concept not in CONCEPTS:
        raise ValueError(f"unknown concept {concept!r}")
    rng = np.random.default_rng([seed, 7, list(CONCEPTS).index(concept)])
    sizes = [MIN_OBJ + (MAX_OBJ - MIN_OBJ) * i // max(n - 1, 1) for i in range(n)]
    sizes = [int(s) for s in rng.permutation(sizes)]
    out, seen = [], set()
    for s in sizes:
        while True:
            cx, cy = int(rng.integers(CENTRE_LO, CENTRE_HI + 1)), int(rng.integers(CENTRE_LO, CENTRE_HI + 1))
            if (cx, cy) not in seen:
                break
        seen.add((cx, cy))
        out.append(Scene(cls=CONCEPTS[concept]["superclass"], colour=None, context="plain", concept=concept,
                         size=s, cx=cx, cy=cy, seed=int(rng.integers(2**31 - 1))))
    return out


CONTEXT_PROMPTS = tuple(f"a {{}} {p}" for p in CONTEXTS.values() if p)
COLOUR_PROMPTS = tuple(f"a {c} {{}}" for c in COLOURS)
# The world's prompt set: 9 context prompts then 6 colour prompts.
WORLD_PROMPTS: tuple[str, ...] = CONTEXT_PROMPTS + COLOUR_PROMPTS


def fill(template: str, subject: str) -> str:
    """Put a subject into a template: fill("a red {}", "sks star") -> "a red sks star"."""
    if template.count("{}") != 1:
        raise ValueError(f"template {template!r} must hold exactly one {{}}")
    return template.replace("{}", subject)
