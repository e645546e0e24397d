"""Training recipes as data: one frozen `Recipe` per method.

A recipe only says *what* trains and with which hyperparameters; the loop in `loop.py`
is the same for every method. SVDiff (arXiv 2303.11305) and DreamBooth (arXiv 2208.12242)
follow the study's own runs (Stable Diffusion 2 base, fp32, batch 1, AdamW with weight
decay 1e-2, constant learning rate); LoRA (arXiv 2106.09685) follows diffusers'
`train_dreambooth_lora.py` defaults; textual inversion (arXiv 2208.01618) the study's
baseline run (diffusers' example with lr 5e-3 and 10,000 steps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

METHODS = ("svdiff", "dreambooth", "lora", "textual-inversion")

# The 27 prompt templates of textual inversion ("imagenet_templates_small").
TI_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
QKV = ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Recipe:
    """Everything that differs between methods.

    `prompts` are templates filled with the concept phrase (one is drawn per sample);
    `lr_1d` is the learning rate of the one-scalar shifts of normalisation layers (SVDiff);
    `crop` is "center" (square centre crop, then resize) or "none" (resize the whole image);
    `flip` the probability of a horizontal flip; `rank` the LoRA rank.
    """
    method: str
    lr: float
    steps: int
    batch_size: int = 1
    lr_1d: float | None = None
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None
    prompts: tuple[str, ...] = ("a photo of {}",)
    train_text_encoder: bool = False
    targets: tuple[str, ...] = ()
    rank: int | None = None
    crop: str = "center"
    interpolation: str = "lanczos"
    flip: float = 0.0
    checkpoint_every: int = 200
    source: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("lr", "weight_decay", "eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.lr_1d is not None and not self.lr_1d >= 0:
            raise ValueError(f"lr_1d must be >= 0, got {self.lr_1d!r}")
        for name in ("steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a whole number > 0, got {value!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if not self.prompts or any(p.count("{}") != 1 for p in self.prompts):
            raise ValueError("every prompt template must hold exactly one {} for the phrase")
        if self.crop not in ("center", "none"):
            raise ValueError(f"crop must be 'center' or 'none', got {self.crop!r}")
        if self.interpolation not in ("lanczos", "bicubic", "bilinear"):
            raise ValueError(f"interpolation must be lanczos, bicubic or bilinear, got {self.interpolation!r}")
        if not 0.0 <= self.flip <= 1.0:
            raise ValueError(f"flip must be a probability, got {self.flip!r}")
        if self.method == "lora" and (not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"a LoRA recipe needs a rank > 0, got {self.rank!r}")

    def replace(self, **changes) -> "Recipe":
        """A copy with the given fields changed (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    # The study: every Linear/Conv/Norm/Embedding of UNet and text encoder shifted, norms at 1e-6,
    # no clipping, the fixed prompt "a photo of sks dog"; it evaluates 1600 updates.
    "svdiff": Recipe(method="svdiff", lr=1e-3, lr_1d=1e-6, steps=1600, train_text_encoder=True,
                     source="study (SVDiff, arXiv 2303.11305): checkpoint-1600, lr 1e-3, 1-D lr 1e-6"),
    # The study's DreamBooth baseline: q/k/v of UNet and text encoder, lr 2e-5 (its runnable
    # command; the paper's 1e-3 is implausible on full weights), 400 updates.
    "dreambooth": Recipe(method="dreambooth", lr=2e-5, steps=400, train_text_encoder=True, targets=QKV,
                         source="study (DreamBooth, arXiv 2208.12242, q/k/v only): checkpoint-400, lr 2e-5"),
    # diffusers' train_dreambooth_lora.py: rank 4, alpha = rank, attention projections, clip 1.0.
    "lora": Recipe(method="lora", lr=5e-4, steps=500, max_grad_norm=1.0, rank=4,
                   targets=("to_q", "to_k", "to_v", "to_out.0"),
                   source="diffusers train_dreambooth_lora.py defaults (LoRA, arXiv 2106.09685)"),
    # The study's textual-inversion baseline: one new token initialised from the superclass,
    # 27 templates with the token alone, whole-image bicubic resize and random flips.
    "textual-inversion": Recipe(method="textual-inversion", lr=5e-3, steps=10_000, prompts=TI_TEMPLATES,
                                crop="none", interpolation="bicubic", flip=0.5, checkpoint_every=1000,
                                source="study (textual inversion, arXiv 2208.01618): 10,000 steps, lr 5e-3"),
}


def recipe(method: str) -> Recipe:
    """The default recipe of `method` (also accepts "textual_inversion" and "ti")."""
    key = {"textual_inversion": "textual-inversion", "ti": "textual-inversion"}.get(method, method)
    if key not in RECIPES:
        from ..errors import UserError
        raise UserError(f"--method: {method!r} is not one of {' | '.join(METHODS)}")
    return RECIPES[key]
