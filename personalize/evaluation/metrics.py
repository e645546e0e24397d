"""The study's metrics (docs/evaluation.md): image similarity (IS), text similarity (TS,
and TS with the class noun) on CLIP ViT-B/32, and DINO image similarity. A folder in
open_clip's own layout (`open_clip_config.json` + weights, as the world's metric model
ships) stands in for CLIP, with its own preprocessing and tokenizer.

The math is pure functions over embeddings; `MetricModels` only turns images and texts
into L2-normalised embeddings. Models are loaded once per process. Where no weights can
be had (offline), a model is built from its config with seeded random weights, and
`MetricModels.random_weights` says so, so that every number made with it is labelled.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import open_clip
import timm
import torch
from torchvision import transforms as T

from personalize.errors import UserError

CLIP_MODEL = "ViT-B-32-quickgelu"  # the plain "ViT-B-32" would load OpenAI's weights into GELU
CLIP_TAG = "openai"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_MODELS = {"dinov2": "vit_small_patch14_dinov2", "dino": "vit_small_patch16_224.dino"}
DINO_CHOICES = tuple(DINO_MODELS) + ("none",)
OPEN_CLIP_CONFIG = "open_clip_config.json"  # a CLIP folder in open_clip's own layout
RANDOM_SEED = 0  # random-weight fallbacks are seeded: every process builds the same model


# ---------------------------------------------------------------------------------------
# The math: pure functions of embeddings


def normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines between every row of `a` and every row of `b`, shape (len(a), len(b))."""
    return normalize(a.float()) @ normalize(b.float()).T


def image_similarity(references: torch.Tensor, generated: torch.Tensor) -> float:
    """IS of one prompt: the mean of the full cosine matrix between every reference image
    and every generated image."""
    return float(cosine_matrix(references, generated).mean())


def per_image_similarity(references: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Each generated image's mean cosine to the references. Their mean over the images
    of a prompt is that prompt's IS (a matrix mean is the mean of its column means), so a
    results table can keep one row per image."""
    return cosine_matrix(generated, references).mean(dim=1)


def text_similarity(text: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """TS of each image: the cosine between its embedding and the text's (one vector)."""
    return cosine_matrix(images, text.reshape(1, -1))[:, 0]


def image_scores(gen_clip, ref_clip, ts_text, ts_class_text, gen_dino=None, ref_dino=None) -> dict[str, list]:
    """Per-image `is`, `ts`, `ts_class` and (with DINO embeddings) `dino`."""
    out = {"is": per_image_similarity(ref_clip, gen_clip), "ts": text_similarity(ts_text, gen_clip),
           "ts_class": text_similarity(ts_class_text, gen_clip)}
    if gen_dino is not None:
        out["dino"] = per_image_similarity(ref_dino, gen_dino)
    return {k: [float(v) for v in values] for k, values in out.items()}


# ---------------------------------------------------------------------------------------
# Preprocessing (docs/evaluation.md)


def clip_transform():
    """Bicubic resize of the short side to 224, center crop 224, CLIP mean/std."""

    return T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                      T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def folder_transform(config: dict):
    """The preprocessing an open_clip folder's config asks for: resize of the short side
    to the model's image size, center crop, the config's mean/std."""

    size = config["model_cfg"]["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    pre = config.get("preprocess_cfg", {})
    interpolation = getattr(T.InterpolationMode, str(pre.get("interpolation", "bicubic")).upper())
    return T.Compose([T.Resize(size, interpolation=interpolation), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(pre.get("mean", CLIP_MEAN), pre.get("std", CLIP_STD))])


def dino_transform():
    """Bicubic resize to 256, center crop 224, ImageNet mean/std."""

    return T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ---------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class MetricSettings:
    clip: str = CLIP_TAG              # open_clip pretrained tag of ViT-B-32-quickgelu, a checkpoint file,
                                      # or a folder in open_clip's layout (open_clip_config.json + weights)
    dino: str = "dinov2"              # dinov2 (ViT-S/14) | dino (v1, ViT-S/16) | none
    dino_weights: str | None = None   # a checkpoint file; None: the model's hub weights
    allow_random: bool = True         # no weights to be had: random weights (labelled) or an error
    device: str = "cpu"

    def check(self) -> "MetricSettings":
        if self.dino not in DINO_CHOICES:
            raise UserError(f"metrics.dino: {self.dino!r} is not one of {' | '.join(DINO_CHOICES)}")
        for key in ("clip", "dino_weights"):
            value = getattr(self, key)
            if value is None or not looks_like_path(value):
                continue
            path = Path(value).expanduser()
            if key == "clip" and path.is_dir():
                if not (path / OPEN_CLIP_CONFIG).is_file():
                    raise UserError(f"metrics.clip: the folder {value} has no {OPEN_CLIP_CONFIG} "
                                    "(give a folder in open_clip's layout, or a checkpoint file)")
            elif not path.is_file():
                raise UserError(f"metrics.{key}: the checkpoint file {value} does not exist")
        if not isinstance(self.allow_random, bool):
            raise UserError(f"metrics.allow_random: {self.allow_random!r} must be true or false")
        return self


def looks_like_path(value: str) -> bool:
    """A weights value names a file when it has a folder separator or a suffix; a
    pretrained tag like `openai` has neither (nor does an `hf-hub:org/name` id)."""
    if value.startswith("hf-hub:"):
        return False
    return "/" in value or "\\" in value or Path(value).suffix != ""


class MetricModels:
    """CLIP and DINO encoders with their preprocessing. Embeddings are L2-normalised."""

    def __init__(self, clip, tokenizer, dino, *, clip_label: str, dino_label: str, random: tuple[str, ...],
                 device: str, clip_pre=None):
        self.clip, self.tokenizer, self.dino = clip, tokenizer, dino
        self.clip_label, self.dino_label = clip_label, dino_label
        self.random = random                      # names of the models that have random weights
        self.device = torch.device(device)
        self.clip_pre, self.dino_pre = clip_pre or clip_transform(), dino_transform()

    @property
    def random_weights(self) -> bool:
        return bool(self.random)

    def describe(self) -> str:
        """What made the numbers, for results tables: `clip=...; dino=...`."""
        return f"clip={self.clip_label}; dino={self.dino_label}"

    @torch.inference_mode()
    def clip_images(self, images) -> torch.Tensor:
        x = torch.stack([self.clip_pre(im.convert("RGB")) for im in images]).to(self.device)
        return normalize(self.clip.encode_image(x).float()).cpu()

    @torch.inference_mode()
    def clip_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return normalize(self.clip.encode_text(tokens).float()).cpu()

    @torch.inference_mode()
    def dino_images(self, images) -> torch.Tensor | None:
        if self.dino is None:
            return None
        x = torch.stack([self.dino_pre(im.convert("RGB")) for im in images]).to(self.device)
        return normalize(self.dino(x).float()).cpu()


def load_metric_models(settings: MetricSettings) -> MetricModels:
    """The metric models for `settings`, built once per process."""
    return _load(settings.check())


@functools.lru_cache(maxsize=2)
def _load(settings: MetricSettings) -> MetricModels:
    random = []
    folder = Path(settings.clip).expanduser() if looks_like_path(settings.clip) else None
    if folder is not None and folder.is_dir():
        return _load_folder(settings, folder)
    clip, clip_label = _load_or_random(
        "CLIP", settings.clip, settings.allow_random,
        lambda: open_clip.create_model(CLIP_MODEL, pretrained=_expand(settings.clip), require_pretrained=True),
        lambda: open_clip.create_model(CLIP_MODEL, pretrained=None))
    if clip_label is None:
        random.append("clip")
    clip_label = f"{CLIP_MODEL}/{clip_label or 'RANDOM'}"
    dino, dino_label, dino_random = _load_dino(settings)
    random += dino_random
    for model in (clip, dino):
        if model is not None:
            model.eval().requires_grad_(False).to(settings.device)
    tokenizer = open_clip.get_tokenizer(CLIP_MODEL)
    return MetricModels(clip, tokenizer, dino, clip_label=clip_label, dino_label=dino_label,
                        random=tuple(random), device=settings.device)


def _load_dino(settings: MetricSettings):
    """DINO as the settings say: (model or None, label, ["dino"] when its weights are random)."""
    if settings.dino == "none":
        return None, "none", []
    name = DINO_MODELS[settings.dino]
    dino, label = _load_or_random(
        "DINO", settings.dino_weights or "hub", settings.allow_random,
        lambda: _timm(name, True, settings.dino_weights), lambda: _timm(name, False, None))
    return dino, f"{name}/{label or 'RANDOM'}", [] if label is not None else ["dino"]


def _load_folder(settings: MetricSettings, folder: Path) -> MetricModels:
    """CLIP from a folder in open_clip's layout, with its preprocessing and tokenizer (the
    world's metric model). DINO as the settings say."""

    try:
        with _quiet_logging():
            clip = open_clip.create_model(f"local-dir:{folder}")
            tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        pre = folder_transform(config)
    except Exception as e:  # a broken folder: say which and why
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"metrics: could not load the CLIP folder {folder}: {reason}") from None
    clip.eval().requires_grad_(False).to(settings.device)
    dino, dino_label, random = _load_dino(settings)
    if dino is not None:
        dino.eval().requires_grad_(False).to(settings.device)
    return MetricModels(clip, tokenizer, dino, clip_label=f"open_clip folder {folder.resolve().parent.name}/{folder.name}",
                        dino_label=dino_label, random=tuple(random), device=settings.device, clip_pre=pre)


def _expand(value: str) -> str:
    return str(Path(value).expanduser()) if looks_like_path(value) else value


def _timm(name: str, pretrained: bool, file: str | None):
    # DINOv2's weights are for 518 px; the study feeds 224 px crops and interpolates the
    # position embeddings at run time, as the reference hub model does.
    extra = {"dynamic_img_size": True} if "dinov2" in name else {}
    if file:
        extra["pretrained_cfg_overlay"] = {"file": _expand(file)}
    return timm.create_model(name, pretrained=pretrained, num_classes=0, **extra)


def _load_or_random(what: str, source: str, allow_random: bool, load, build_random):
    """(model, label of its weights); the label is None when the weights are random.

    A checkpoint file the user named must load; hub weights that cannot be had (offline,
    not in the cache) fall back to seeded random weights when allowed."""
    try:
        with _quiet_logging():  # open_clip logs its failures; the warning below says it once, plainly
            return load(), source
    except Exception as e:  # any failure to get the weights: offline, bad file, hub error
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        if looks_like_path(source) and source != "hub":
            raise UserError(f"metrics: could not load the {what} weights {source}: {reason}") from None
        if not allow_random:
            raise UserError(f"metrics: the {what} weights {source!r} cannot be had here ({reason}); "
                            "give a local checkpoint file, or allow_random: true") from None
    print(f"warning: {what} weights {source!r} could not be loaded; {what} metrics use RANDOM weights "
          "and are labelled so (not comparable with the study's numbers)", file=sys.stderr)
    with torch.random.fork_rng(devices=[]), _quiet_logging():
        torch.manual_seed(RANDOM_SEED)
        return build_random(), None


@contextlib.contextmanager
def _quiet_logging():
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
