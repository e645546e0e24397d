"""The world's judge: reads an image's truth from its pixels alone, and checks it
against the prompt the image was made from.

It never sees a scene: it works on any 64 x 64 image (or any size, resized), clean
renders and a diffusion model's imperfect samples alike, so every step is a robust
statistic with tolerances rather than an exact match:

1. Context. Each context is a set of colours allowed per image row (the upper third of
   snow, the sea band of the beach, the grass under the mountain, ...), widened by a few
   rows for misplaced horizons. A pixel's cost under a context is its RGB distance to the
   nearest allowed colour or to the segment between two of them (blurred borders mix
   colours), clipped; the context with the lowest mean cost over pixels that are not
   clearly object-coloured wins, and it is read again with the object's pixels left out.
2. Object. Pixels nearer to an object colour (the palette or a concept colour) than to
   the context's colours, or explained by no background colour at all; small specks are
   dropped and holes filled. White stripes of a striped ball that vanish into snow are
   taken back between black stripes.
3. Class: the mask's bounding box, resampled to a square, against the four shapes'
   templates (a square box fills its box, a disc 0.79, a triangle 0.5, a star 0.35).
4. Colour: each inner object pixel votes for its nearest palette colour (pixels nearer a
   concept colour vote for none); the winner is the colour when it holds a fair share.
5. Concepts: the share of the object's pixels whose colour sits where the concept's
   layout puts it (teal left, magenta right, a yellow disc at the centre; five
   horizontal stripes, black, white, black, white, black).

numpy, PIL and scipy only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from . import scene as W

SIZE = W.SIZE
CLIP = 40.0            # a pixel's context cost is clipped here (objects cost every context alike)
SEG_PENALTY = 8.0      # added to a pixel's distance to a mix of two background colours
ROW_TOL = 3            # rows by which each context's bands are widened
OBJ_MARGIN = 10.0      # a pixel is clearly object-coloured when this much nearer an object colour
BG_EXPLAINED = 22.0    # a pixel this near the context's colours is background, unless nearer an object colour
UNEXPLAINED = 60.0     # a pixel this far from every context colour is object, whatever its colour
LABEL_MAX = 75.0       # a pixel further than this from every object colour has no colour label
COLOUR_SHARE = 0.3     # the winning palette colour must hold this share of the object's pixels
CONCEPT_SCORE = 0.6    # concept: this share of the object's pixels in the concept's layout
CONCEPT_MIN_EACH = 0.15  # ... and each of its two main colours at least this share
MIN_OBJECT = 20        # pixels; fewer is no object

CONCEPT_COLOURS = {"teal": W.TEAL, "magenta": W.MAGENTA, "black": W.BLACK, "white": W.WHITE}
OBJ_NAMES = list(W.COLOURS) + list(CONCEPT_COLOURS)
OBJ_RGB = np.array([*W.COLOURS.values(), *CONCEPT_COLOURS.values()], np.float32)
N_PALETTE = len(W.COLOURS)
_IDX = {n: i for i, n in enumerate(OBJ_NAMES)}


def _bands(context: str) -> list[tuple[int, int, tuple]]:
    """(first row, end row, allowed colours) of a context's background."""
    full = SIZE
    if context == "plain":
        return [(0, full, (W.PLAIN,))]
    if context == "jungle":
        return [(0, full, (W.JUNGLE, W.LEAF))]
    if context == "snow":
        return [(0, W.THIRD, (W.SNOW_FAR,)), (W.THIRD, full, (W.SNOW, W.SNOW_DOT))]
    if context == "beach":
        return [(0, W.THIRD, (W.SKY,)), (W.THIRD, W.SEA_END, (W.SEA,)), (W.SEA_END, full, (W.SAND,))]
    if context == "cobblestone":
        return [(0, full, (W.STONE, W.STONE_EDGE))]
    if context == "pink fabric":
        return [(0, full, (W.PINK, W.PINK_LINE))]
    if context == "wooden floor":
        return [(0, full, (W.WOOD, W.WOOD_LINE))]
    if context == "city":
        top = SIZE - W.CITY_MAX_H
        return [(0, top, (W.SKY,)), (top, full, (W.SKY, W.BUILDING))]
    if context == "mountain":
        cap_end = W.MOUNTAIN_CAP_END
        return [(0, cap_end, (W.SKY, W.ROCK, W.CAP)), (cap_end, W.MOUNTAIN_GRASS, (W.SKY, W.ROCK)),
                (W.MOUNTAIN_GRASS, full, (W.GRASS,))]
    if context == "blue house":
        return [(0, W.HOUSE_GRASS, (W.SKY, W.HOUSE)), (W.HOUSE_GRASS, full, (W.GRASS,))]
    raise ValueError(f"unknown context {context!r}")


def _build_tables():
    """Segments (a, b) of all contexts, and per context a (rows, segments) allowed table."""
    segs: list[tuple[tuple, tuple]] = []
    index: dict[tuple, int] = {}

    def seg(a, b):
        key = (a, b) if a <= b else (b, a)
        if key not in index:
            index[key] = len(segs)
            segs.append(key)
        return index[key]

    rows_sets = {}
    for ctx in W.CONTEXTS:
        per_row = [set() for _ in range(SIZE)]
        for lo, hi, cols in _bands(ctx):
            for y in range(max(0, lo - ROW_TOL), min(SIZE, hi + ROW_TOL)):
                per_row[y].update(cols)
        rows_sets[ctx] = per_row
    tables = {}
    for ctx, per_row in rows_sets.items():
        ids = [[seg(a, a) for a in cols] + [seg(a, b) for a, b in combinations(sorted(cols), 2)]
               for cols in per_row]
        tables[ctx] = ids
    n = len(segs)
    allowed = {}
    for ctx, ids in tables.items():
        used = sorted({i for row in ids for i in row})
        t = np.zeros((SIZE, len(used)), bool)
        pos = {i: k for k, i in enumerate(used)}
        for y, row in enumerate(ids):
            for i in row:
                t[y, pos[i]] = True
        allowed[ctx] = (np.array(used), t)
    a = np.array([s[0] for s in segs], np.float32)
    b = np.array([s[1] for s in segs], np.float32)
    assert len(a) == n
    return a, b, allowed


_SEG_A, _SEG_B, _ALLOWED = _build_tables()
_ALL_BG = np.array(sorted({c for ctx in W.CONTEXTS for _, _, cols in _bands(ctx) for c in cols}), np.float32)


_AB = _SEG_B - _SEG_A                                        # (S, 3)
_AB_DEN = np.maximum((_AB * _AB).sum(-1), 1e-6)              # (S,)
_A_AB = (_SEG_A * _AB).sum(-1)                               # (S,)
_A_SQ = (_SEG_A * _SEG_A).sum(-1)                            # (S,)
_INV_DEN = (1.0 / _AB_DEN).astype(np.float32)
_SEG_PENALTY = np.where(_AB_DEN > 1e-3, SEG_PENALTY, 0.0).astype(np.float32)


def _sq_dists(px: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(N, K) squared distances between pixels and points, by expansion (fast)."""
    return np.maximum((px * px).sum(-1)[:, None] - 2.0 * (px @ pts.T) + (pts * pts).sum(-1)[None], 0.0)


def _seg_dist(px: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """(N, S) distance of each pixel to each background segment (or to segments `idx`);
    a mix of two colours (a blurred border) costs SEG_PENALTY more than a colour itself."""
    if idx is None:
        a, ab, a_sq, a_ab, den, inv, pen = _SEG_A, _AB, _A_SQ, _A_AB, _AB_DEN, _INV_DEN, _SEG_PENALTY
    else:
        a, ab, a_sq, a_ab = _SEG_A[idx], _AB[idx], _A_SQ[idx], _A_AB[idx]
        den, inv, pen = _AB_DEN[idx], _INV_DEN[idx], _SEG_PENALTY[idx]
    pa_sq = (px * px).sum(-1)[:, None] - 2.0 * (px @ a.T) + a_sq[None]
    dot = px @ ab.T - a_ab[None]                             # (p - a) . (b - a)
    t = np.minimum(np.maximum(dot * inv[None], 0.0), 1.0)
    d2 = pa_sq - t * (2.0 * dot - t * den[None])
    return np.sqrt(np.maximum(d2, 0.0)) + pen[None]


def _context_dists(img: np.ndarray, step: int) -> dict[str, np.ndarray]:
    """Per context, the distance of each pixel (every `step`-th row and column) to the
    colours allowed in its row."""
    sub = img[::step, ::step]
    h, w = sub.shape[:2]
    seg_d = _seg_dist(sub.reshape(-1, 3)).reshape(h, w, -1)
    out = {}
    for ctx, (used, table) in _ALLOWED.items():
        out[ctx] = np.where(table[::step, None, :], seg_d[:, :, used], np.inf).min(-1)
    return out


def _context_dist(img: np.ndarray, ctx: str) -> np.ndarray:
    """(64, 64) distance of each pixel to the colours that context `ctx` allows in its row."""
    used, table = _ALLOWED[ctx]
    d = _seg_dist(img.reshape(-1, 3), used).reshape(SIZE, SIZE, -1)
    return np.where(table[:, None, :], d, np.inf).min(-1)


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        im = image.convert("RGB")
        if im.size != (SIZE, SIZE):
            im = im.resize((SIZE, SIZE), Image.BOX if im.size[0] > SIZE else Image.BILINEAR)
        return np.asarray(im, np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32)
        if arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).round().astype(np.uint8)
    if arr.shape[:2] != (SIZE, SIZE):
        big = arr.shape[0] > SIZE
        arr = np.asarray(Image.fromarray(arr).resize((SIZE, SIZE), Image.BOX if big else Image.BILINEAR))
    return arr.astype(np.float32)


def _obj_dists(px: np.ndarray) -> np.ndarray:
    return np.sqrt(_sq_dists(px, OBJ_RGB))  # (N, 10)


def _context_scores(ctx_d: dict, weight: np.ndarray) -> dict[str, float]:
    w = weight / max(weight.sum(), 1e-6)
    return {c: float((np.minimum(d, CLIP) * w).sum()) for c, d in ctx_d.items()}


def _object_mask(d_bg: np.ndarray, d_obj_min: np.ndarray, label: np.ndarray) -> np.ndarray:
    cand = ((d_obj_min < d_bg) & (d_bg > BG_EXPLAINED)) | (d_bg > UNEXPLAINED)
    lab, n = ndimage.label(cand, structure=np.ones((3, 3)))
    if n == 0:
        return cand
    areas = ndimage.sum(cand, lab, index=np.arange(1, n + 1))
    keep = np.zeros(n + 1, bool)
    keep[1:] = areas >= max(8.0, 0.1 * areas.max())
    mask = keep[lab]
    # A striped ball's white stripes can vanish into white backgrounds and its blurred
    # stripe borders into grey ones: close the mask vertically across a stripe's height.
    black = mask & (label == _IDX["black"])
    if black.sum() >= 0.2 * max(mask.sum(), 1):
        mask = mask | ndimage.binary_closing(mask, structure=np.ones((11, 1), bool))
    return ndimage.binary_fill_holes(mask)


# --- class templates --------------------------------------------------------------------

TEMPLATE = 24


def _despur(mask: np.ndarray) -> np.ndarray:
    """Drop pixels with fewer than two 4-neighbours in the mask (specks glued to an edge)."""
    p = np.pad(mask, 1)
    n4 = p[:-2, 1:-1].astype(np.int8) + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
    out = mask & (n4 >= 2)
    return out if out.any() else mask


def _crop_resize(mask: np.ndarray) -> np.ndarray:
    mask = _despur(mask)
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    return np.asarray(Image.fromarray(crop, "F").resize((TEMPLATE, TEMPLATE), Image.BILINEAR))


def _templates() -> dict[str, np.ndarray]:
    """Per class, (K, T, T) masks: every size, drawn and as blur leaves it (a blurred
    shape's mask loses thin tips and corners: thresholds of the blurred mask stand in)."""

    out = {}
    for cls in W.CLASSES:
        ts = []
        for s in range(W.MIN_OBJ, W.MAX_OBJ + 1):
            m = W.object_mask(W.Scene(cls, "red", "plain", None, s, 32, 32, 0))
            ts.append(_crop_resize(m))
            soft = np.asarray(Image.fromarray((m * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)))
            for thr in (90, 128, 166):
                ts.append(_crop_resize(soft > thr))
        out[cls] = np.stack(ts)
    return out


_TEMPLATES = _templates()


def _class_scores(mask: np.ndarray) -> dict[str, float]:
    m = _crop_resize(mask)
    return {c: float(1.0 - np.abs(m[None] - t).mean((1, 2)).min()) for c, t in _TEMPLATES.items()}


# --- concepts ---------------------------------------------------------------------------

def _concept_scores(img: np.ndarray, mask: np.ndarray, label: np.ndarray) -> dict[str, dict]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    w, h = x1 - x0, y1 - y0
    inner = ndimage.binary_erosion(mask)
    use = inner if inner.sum() >= 0.3 * mask.sum() else mask
    yy, xx = np.nonzero(use)
    lab = label[yy, xx]
    n = max(len(lab), 1)
    out = {}
    # star: teal left of the centre column, magenta right, a yellow disc at the star's centre
    xc = x0 + w / 2 - 0.5
    yc = y0 + (h - 1) / W._STAR_H
    teal, mag, yel = lab == _IDX["teal"], lab == _IDX["magenta"], lab == _IDX["yellow"]
    disc = (xx - xc) ** 2 + (yy - yc) ** 2 <= (max(w, h) / 10 + 2) ** 2
    near_mid = np.abs(xx - xc) <= 1.5
    ok = (teal & ((xx < xc) | near_mid)) | (mag & ((xx > xc) | near_mid)) | (yel & disc)
    out["star"] = {"score": float(ok.sum() / n), "parts": (float(teal.sum() / n), float(mag.sum() / n))}
    # ball: five horizontal stripes, black / white / black / white / black, read as dark
    # and light grey pixels (blur turns stripe borders grey, so a pixel's side is its
    # luminance), ignoring the pixel rows at stripe borders
    rgb = img[yy, xx]
    lum = rgb.mean(-1)
    grey = (rgb.max(-1) - rgb.min(-1)) < 70
    dark, light = grey & (lum < 128), grey & (lum >= 128)
    # The mask may miss a dark cap that blurred into a dark background (or hold a row too
    # many): the stripes' extent is searched a few rows around the mask's.
    best = (0.0, (float(dark.mean()), float(light.mean())))
    if min(best[1]) < CONCEPT_MIN_EACH / 2:  # not a black-and-white object: no search
        out["ball"] = {"score": 0.0, "parts": best[1]}
        return out
    for top in range(y0 - 4, y0 + 2):
        for bottom in range(y1 - 1, y1 + 5):
            hh = bottom - top
            if hh < 10:
                continue
            pos = (yy - top + 0.5) * 5.0 / hh
            inside = (pos >= 0) & (pos < 5)
            stripe = np.clip(np.floor(pos), 0, 4).astype(int)
            core = inside & (np.abs(pos - np.round(pos)) * hh / 5.0 > 1.0)  # off the stripe borders
            want_dark = stripe % 2 == 0
            ok = core & ((dark & want_dark) | (light & ~want_dark))
            nc = max(core.sum() + (~inside).sum(), 1)
            score = float(ok.sum() / nc)
            if score > best[0]:
                best = (score, (float((core & dark).sum() / nc), float((core & light).sum() / nc)))
    out["ball"] = {"score": best[0], "parts": best[1]}
    return out


# --- reading ----------------------------------------------------------------------------

def read_image(image) -> dict:
    """The truth read from pixels alone.

    Returns context (and the per-context costs), the object mask (64 x 64 bool), class
    (None when no object is found) with per-class scores, colour (a palette word, or None
    when no palette colour holds a fair share of the object, as for a concept) and per
    concept its layout score and whether the object is that concept (`is_concept`).
    """
    img = _to_array(image)
    px = img.reshape(-1, 3)
    od = _obj_dists(px)
    d_obj_min = od.min(-1).reshape(SIZE, SIZE)
    label = od.argmin(-1).reshape(SIZE, SIZE)
    label = np.where(d_obj_min <= LABEL_MAX, label, -1)

    # pass 1: context over the pixels that are not clearly object-coloured (every other
    # row and column is plenty for a background)
    step = 2
    ctx_d = _context_dists(img, step)
    d_all_bg = np.sqrt(_sq_dists(px, _ALL_BG).min(-1)).reshape(SIZE, SIZE)
    weight = ~(d_obj_min + OBJ_MARGIN < d_all_bg)
    if weight.sum() < 0.3 * SIZE * SIZE:
        weight = np.ones_like(weight)
    scores = _context_scores(ctx_d, weight[::step, ::step].astype(np.float32))
    context = min(scores, key=scores.get)
    mask = _object_mask(_context_dist(img, context), d_obj_min, label)
    # pass 2: context read away from the object
    away = ~ndimage.binary_dilation(mask, iterations=2)
    if away.sum() >= 0.3 * SIZE * SIZE:
        scores = _context_scores(ctx_d, away[::step, ::step].astype(np.float32))
        ctx2 = min(scores, key=scores.get)
        if ctx2 != context:
            context = ctx2
            mask = _object_mask(_context_dist(img, context), d_obj_min, label)

    out = {"context": context, "context_scores": scores, "mask": mask, "cls": None, "class_scores": {},
           "colour": None, "colour_share": 0.0,
           "concept_scores": {c: 0.0 for c in W.CONCEPTS}, "is_concept": {c: False for c in W.CONCEPTS}}
    if mask.sum() < MIN_OBJECT:
        return out
    cs = _class_scores(mask)
    out["class_scores"] = cs
    out["cls"] = max(cs, key=cs.get)

    inner = ndimage.binary_erosion(mask)
    use = inner if inner.sum() >= 0.3 * mask.sum() else mask
    lab = label[use]
    votes = np.bincount(lab[(lab >= 0) & (lab < N_PALETTE)], minlength=N_PALETTE)
    best = int(votes.argmax())
    share = float(votes[best] / max(len(lab), 1))
    out["colour_share"] = share
    if share >= COLOUR_SHARE:
        out["colour"] = OBJ_NAMES[best]

    concepts = _concept_scores(img, mask, label)
    for c, r in concepts.items():
        out["concept_scores"][c] = r["score"]
        out["is_concept"][c] = r["score"] >= CONCEPT_SCORE and min(r["parts"]) >= CONCEPT_MIN_EACH
    return out


# --- prompts ----------------------------------------------------------------------------

_DEFAULT_PHRASES = {k: v["phrase"] for k, v in W.CONCEPTS.items()}
_PHRASE_TO_CONTEXT = {p: c for c, p in W.CONTEXTS.items() if p}


def parse_prompt(prompt: str, concept_phrases: dict[str, str] | None = None) -> dict:
    """What a world prompt asks for: {"cls", "colour", "context", "concept"}.

    Accepts the caption form ("a photo of a red ball in the snow") and the template form
    ("a sks star in the snow", "a red sks star"); `concept_phrases` maps concept keys to
    their phrases (the world's own by default). A concept's class is its superclass.
    Raises ValueError naming the prompt when it is not a world prompt.
    """
    phrases = _DEFAULT_PHRASES if concept_phrases is None else dict(concept_phrases)
    text = re.sub(r"\s+", " ", str(prompt).strip().lower()).rstrip(".").strip()
    rest = text
    if rest.startswith(W.PHOTO_PREFIX):
        rest = rest[len(W.PHOTO_PREFIX):]
    m = re.match(r"^(a|an) (.*)$", rest)
    if not m:
        raise ValueError(f"not a world prompt: {prompt!r}")
    rest = m.group(2)
    colour = None
    first, _, tail = rest.partition(" ")
    if first in W.COLOURS and tail:
        colour, rest = first, tail
    concept = cls = None
    for key, phrase in sorted(phrases.items(), key=lambda kv: -len(kv[1])):
        p = re.sub(r"\s+", " ", phrase.strip().lower())
        if rest == p or rest.startswith(p + " "):
            if key not in W.CONCEPTS:
                raise ValueError(f"unknown concept {key!r} in the phrases for prompt {prompt!r}")
            concept, cls, rest = key, W.CONCEPTS[key]["superclass"], rest[len(p):].strip()
            break
    if concept is None:
        first, _, tail = rest.partition(" ")
        if first not in W.CLASSES:
            raise ValueError(f"not a world prompt: {prompt!r}")
        cls, rest = first, tail.strip()
    if rest == "":
        context = "plain"
    elif rest in _PHRASE_TO_CONTEXT:
        context = _PHRASE_TO_CONTEXT[rest]
    else:
        raise ValueError(f"not a world prompt: {prompt!r}")
    return {"cls": cls, "colour": colour, "context": context, "concept": concept}


# --- verdicts ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """What the pixels show (context, cls, colour, is_concept) and how that meets the prompt.

    colour_ok is None when the prompt names no colour; concept is None when it names no
    concept.
    """

    context: str
    cls: str | None
    colour: str | None
    is_concept: dict[str, bool]
    context_ok: bool
    class_ok: bool
    colour_ok: bool | None
    concept: bool | None


def judge(image, prompt: str, concept_phrases: dict[str, str] | None = None) -> Verdict:
    """Judge an image against the world prompt it was made from."""
    want = parse_prompt(prompt, concept_phrases)
    r = read_image(image)
    return Verdict(
        context=r["context"], cls=r["cls"], colour=r["colour"], is_concept=dict(r["is_concept"]),
        context_ok=r["context"] == want["context"],
        class_ok=r["cls"] == want["cls"],
        colour_ok=None if want["colour"] is None else r["colour"] == want["colour"],
        concept=None if want["concept"] is None else bool(r["is_concept"][want["concept"]]),
    )


def fidelity(verdicts) -> dict:
    """The world's counterparts of the study's IS and TS over a set of verdicts.

    concept_fidelity: share of `concept` over the verdicts of concept prompts (None when
    there are none); context_fidelity: share of `colour_ok` for colour prompts and of
    `context_ok` for the others; class_fidelity: share of `class_ok`.
    """
    vs = list(verdicts)
    con = [v.concept for v in vs if v.concept is not None]
    text = [v.colour_ok if v.colour_ok is not None else v.context_ok for v in vs]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"n": len(vs), "n_concept": len(con), "concept_fidelity": mean(con),
            "context_fidelity": mean(text), "class_fidelity": mean([v.class_ok for v in vs])}
