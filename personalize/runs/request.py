"""One generation request, from checked input to images and run card: what the command
line, the app and the sweeps call."""

from __future__ import annotations

import json
import math
import os
import threading
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from personalize.concepts.apply import apply_concept
from personalize.errors import UserError
from personalize.models import loading
from personalize.models.loading import SCHEDULERS, check_device, check_model, concept_meta, load_pipeline, model_size
from personalize.prompts import check_template, prompt_pair
from personalize.runs.runcard import run_card
from personalize.sampling import engine
from personalize.sampling.runtime import check_runtime
from personalize.sampling.samplers import MAX_STEPS, configure, plan, total_rows
from personalize.settings import whole_setting

SEED_MAX = 2 ** 63 - 1       # torch.Generator.manual_seed takes a signed 64-bit seed
TRAIN_TIMESTEPS = 1000       # DDPM's; a scheduler config without num_train_timesteps has it


@dataclass(frozen=True)
class Limits:
    """How much one request may ask for. `check` refuses anything over them before a
    plan, a prompt or a model is built; a run's cost is its denoiser rows times its pixels.

    `serving()` is what the app allows anonymous users (each bound can be changed with the
    environment variable named in ENV); `local()` what the command line and sweeps allow
    (still within the scheduler's training timesteps)."""
    max_steps: int = 150
    max_side: int = 1024
    max_images: int = 8
    max_prompt_chars: int = 1000     # template and negative prompt
    max_phrase_chars: int = 100      # concept phrase and superclass
    max_cost: int = 150 * 3 * 4 * 512 * 512  # denoiser rows x pixels of one request

    ENV = {"max_steps": "PERSONALIZE_MAX_STEPS", "max_side": "PERSONALIZE_MAX_SIDE",
           "max_images": "PERSONALIZE_MAX_IMAGES", "max_prompt_chars": "PERSONALIZE_MAX_PROMPT_CHARS",
           "max_phrase_chars": "PERSONALIZE_MAX_PHRASE_CHARS", "max_cost": "PERSONALIZE_MAX_COST"}

    @classmethod
    def serving(cls, environ=None) -> "Limits":
        environ = os.environ if environ is None else environ
        return cls(**{name: whole_setting(var, getattr(cls, name), environ) for name, var in cls.ENV.items()})

    @classmethod
    def local(cls) -> "Limits":
        return cls(max_steps=MAX_STEPS, max_side=4096, max_images=256, max_prompt_chars=20_000,
                   max_phrase_chars=1000, max_cost=10 ** 15)


LOCAL = Limits.local()


def whole(value, name: str, low: int, high: int) -> int:
    """A whole number in [low, high] from what a form or client sent (int, integral float
    or its text); UserError otherwise, never OverflowError or ValueError."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) > 40:
            raise UserError(f"{name}: {text[:20]}... is not a whole number from {low} to {high}")
        try:
            value = int(text) if text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise UserError(f"{name}: {value!r} is not a whole number from {low} to {high}") from None
    if isinstance(value, float):
        if not (math.isfinite(value) and value.is_integer()):
            raise UserError(f"{name}: {value!r} is not a whole number from {low} to {high}")
        if not low <= value <= high:
            raise UserError(f"{name}: {value!r} is outside [{low}, {high}]")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name}: {value!r} is not a whole number from {low} to {high}")
    if not low <= value <= high:
        bits = value.bit_length()
        shown = str(value) if bits < 100 else f"a {len(str(abs(value)))}-digit number" if bits < 10_000 \
            else f"a number of {bits} bits"
        raise UserError(f"{name}: {shown} is outside [{low}, {high}]")
    return value


def train_timesteps(model: str) -> int:
    """The scheduler's number of training timesteps, read from a pipeline folder's
    scheduler config without loading it (1000, DDPM's, for hub ids)."""
    config = Path(model) / "scheduler" / "scheduler_config.json"
    try:
        return int(json.loads(config.read_text()).get("num_train_timesteps", TRAIN_TIMESTEPS))
    except (OSError, ValueError, TypeError):
        return TRAIN_TIMESTEPS


@dataclass
class Request:
    prompt: str
    sampler: str = "concept"
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None            # None: loading.default_model()
    concept: str | None = None
    concept_scale: float = 1.0
    concept_phrase: str | None = None   # None: from the concept's concept.json, else the model's
    superclass: str | None = None
    negative_prompt: str = ""
    steps: int = 50
    seed: int = 0
    num_images: int = 1
    height: int | None = None
    width: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    scheduler: str = "model"
    runtime: str = "torch"              # where the denoiser runs (sampling/runtime.py)


@dataclass
class Prepared:
    """A request with every input checked; nothing has been loaded yet."""
    request: Request
    config: Any
    prompts: Any
    model: str
    concept_phrase: str
    superclass: str
    label: str | None = None  # how the run card names a model chosen by default_model()


def check_text(name: str, value, limit: int, *, empty: bool = True) -> None:
    if value is None and empty:
        return
    if not isinstance(value, str):
        raise UserError(f"{name}: {type(value).__name__} given, text expected")
    if len(value) > limit:
        raise UserError(f"{name}: {len(value)} characters, over the limit of {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{name}: not valid text (a lone surrogate character)") from None


def check_numbers(req: Request, limits: Limits) -> Request:
    """Steps, seed, images, size and text lengths within `limits`, before anything is
    built; returns the request with its numbers as int."""
    sides = {}
    for name, v in (("height", req.height), ("width", req.width)):
        sides[name] = None if v is None else whole(v, f"--{name}", 8, limits.max_side)
        if v is not None and sides[name] % 8:
            raise UserError(f"--{name}: {v} must be a positive multiple of 8")
    check_text("prompt", req.prompt, limits.max_prompt_chars, empty=False)
    check_text("negative prompt", req.negative_prompt, limits.max_prompt_chars)
    check_text("--concept-phrase", req.concept_phrase, limits.max_phrase_chars)
    check_text("--superclass", req.superclass, limits.max_phrase_chars)
    return replace(req, steps=whole(req.steps, "--steps", 1, limits.max_steps),
                   seed=whole(req.seed, "--seed", 0, SEED_MAX),
                   num_images=whole(req.num_images, "--num-images", 1, limits.max_images), **sides)


def cost(prep: "Prepared", side: int) -> int:
    """Denoiser rows x pixels of a checked request (`side`: the model's own size, used
    where the request leaves height or width to the model)."""
    req = prep.request
    rows = total_rows(plan(prep.config), req.num_images)
    return rows * (req.height or side) * (req.width or side)


def check(req: Request, limits: Limits = LOCAL) -> Prepared:
    """Check everything that can be checked without loading a model: first the numbers and
    lengths within `limits`, then the sampler's parameters, the model, and the run's cost."""
    req = check_numbers(req, limits)
    config = configure(req.sampler, req.params, req.steps)
    check_template(req.prompt)
    check_device(req.device, req.dtype)
    check_runtime(req.runtime, req.device, req.dtype)
    if req.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler: {req.scheduler!r} is not one of {' | '.join(SCHEDULERS)}")
    if req.concept is not None:
        from personalize.concepts.files import detect_format
        detect_format(req.concept)
    label = None
    if req.model is None:
        from personalize.models.demo import default_demo_path
        from personalize.models.loading import default_model
        model, _reason = default_model()
        label = f"demo ({model})" if Path(model) == default_demo_path() else f"default ({model})"
    else:
        model = check_model(req.model)
    meta = concept_meta(model, req.concept)
    phrase = req.concept_phrase or meta.get("phrase")
    superclass = req.superclass or meta.get("superclass")
    if not phrase:
        raise UserError("--concept-phrase: not given, and neither the concept nor the model has a concept.json "
                        "to take it from")
    if not superclass:
        raise UserError("--superclass: not given, and neither the concept nor the model has a concept.json "
                        "to take it from")
    check_text("concept phrase", phrase, limits.max_phrase_chars)
    check_text("superclass", superclass, limits.max_phrase_chars)
    steps = train_timesteps(model)
    if req.steps > steps:
        raise UserError(f"--steps: {req.steps} is more than the scheduler's {steps} training timesteps")
    prompts = prompt_pair(req.prompt, phrase, superclass)
    prep = Prepared(req, config, prompts, model, phrase, superclass, label)
    need = cost(prep, model_size(model) or 512)
    if need > limits.max_cost:
        raise UserError(f"this run needs {need:,} denoiser row-pixels (rows x height x width), over this "
                        f"server's limit of {limits.max_cost:,}; use fewer steps or images, a smaller size, "
                        "or a cheaper sampler")
    return prep


def execute(prep: Prepared, *, callback=None, stop: threading.Event | None = None):
    """Load (or reuse) the pipeline and run; returns (RunResult, run card)."""
    req = prep.request
    pipe = load_pipeline(prep.model, device=req.device, dtype=req.dtype, scheduler=req.scheduler)
    applied = use_concept(pipe, req.concept, prep.concept_phrase, req.concept_scale)
    result = engine.run(pipe, prep.prompts, prep.config, seed=req.seed, num_images=req.num_images,
                        height=req.height, width=req.width, negative_prompt=req.negative_prompt,
                        concept_phrase=prep.concept_phrase, callback=callback, stop=stop, runtime=req.runtime)
    height, width = result.size
    card = run_card(config=prep.config, prompts=prep.prompts, negative_prompt=req.negative_prompt,
                    concept_phrase=prep.concept_phrase, superclass=prep.superclass, seed=req.seed,
                    num_images=req.num_images, height=height, width=width,
                    model=req.model or prep.label,
                    concept=None if applied is None else {"path": applied.path, "format": applied.format,
                                                          "scale": req.concept_scale},
                    scheduler=type(pipe.scheduler).__name__, device=req.device, dtype=req.dtype, result=result)
    return result, card


def forget_pipeline(pipe) -> None:
    """Drop `pipe` from the loaded-pipeline cache, so that it is never handed out again."""

    for key in [k for k, v in loading._cache.items() if v is pipe]:
        del loading._cache[key]


# The concept applied to each cached pipeline, so that consecutive runs with the same
# concept do not reload it. Runs on one pipeline never overlap (the app has one queue).
_applied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_concept(pipe, path: str | None, phrase: str, scale: float):
    """Make `pipe` carry exactly the concept at `path` (None: the base model's weights)."""
    key = None if path is None else (str(Path(path).expanduser().resolve()), phrase, float(scale))
    current = _applied.get(pipe)
    if current is not None and current[0] == key:
        return current[1]
    if current is not None:
        try:
            current[1].remove()
        except BaseException:
            # Part of the old concept may still be in the weights: nobody may use this
            # pipeline again (the next request loads a clean one).
            del _applied[pipe]
            forget_pipeline(pipe)
            raise
        del _applied[pipe]
    if key is None:
        return None
    applied = apply_concept(pipe, path, phrase=phrase, scale=scale)
    _applied[pipe] = (key, applied)
    return applied
