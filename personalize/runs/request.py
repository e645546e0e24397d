"""One generation request, from checked input to images and run card: what the command
line, the app and the sweeps call."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalize.sampling import engine
from personalize.errors import UserError
from personalize.models.loading import check_device, check_model, load_pipeline, read_concept_json, SCHEDULERS
from personalize.prompts import check_template, prompt_pair
from personalize.runs.runcard import run_card
from personalize.sampling.samplers import configure


@dataclass
class Request:
    prompt: str
    sampler: str = "concept"
    params: dict[str, Any] = field(default_factory=dict)
    model: str | None = None            # None: loading.default_model()
    concept: str | None = None
    concept_scale: float = 1.0
    concept_phrase: str | None = None   # None: from the model's concept.json
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


def check(req: Request) -> Prepared:
    """Check everything that can be checked without loading a model."""
    config = configure(req.sampler, req.params, req.steps)
    check_template(req.prompt)
    for name, v, low in (("--seed", req.seed, 0), ("--num-images", req.num_images, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UserError(f"{name}: {v!r} must be a whole number >= {low}")
    for name, v in (("--height", req.height), ("--width", req.width)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise UserError(f"{name}: {v!r} must be a positive whole number")
    check_device(req.device, req.dtype)
    if req.scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler: {req.scheduler!r} is not one of {' | '.join(SCHEDULERS)}")
    if req.concept is not None:
        from personalize.concepts.apply import detect_format
        detect_format(req.concept)
    label = None
    if req.model is None:
        from personalize.models.demo import default_demo_path
        from personalize.models.loading import default_model
        model, _reason = default_model()
        label = f"demo ({model})" if Path(model) == default_demo_path() else f"default ({model})"
    else:
        model = check_model(req.model)
    meta = read_concept_json(model) or {}
    phrase = req.concept_phrase or meta.get("phrase")
    superclass = req.superclass or meta.get("superclass")
    if not phrase:
        raise UserError("--concept-phrase: not given, and the model has no concept.json to take it from")
    if not superclass:
        raise UserError("--superclass: not given, and the model has no concept.json to take it from")
    prompts = prompt_pair(req.prompt, phrase, superclass)
    return Prepared(req, config, prompts, model, phrase, superclass, label)


def execute(prep: Prepared, *, callback=None, stop: threading.Event | None = None):
    """Load (or reuse) the pipeline and run; returns (RunResult, run card)."""
    req = prep.request
    pipe = load_pipeline(prep.model, device=req.device, dtype=req.dtype, scheduler=req.scheduler)
    applied = use_concept(pipe, req.concept, prep.concept_phrase, req.concept_scale)
    result = engine.run(pipe, prep.prompts, prep.config, seed=req.seed, num_images=req.num_images,
                        height=req.height, width=req.width, negative_prompt=req.negative_prompt,
                        concept_phrase=prep.concept_phrase, callback=callback, stop=stop)
    height, width = result.size
    card = run_card(config=prep.config, prompts=prep.prompts, negative_prompt=req.negative_prompt,
                    concept_phrase=prep.concept_phrase, superclass=prep.superclass, seed=req.seed,
                    num_images=req.num_images, height=height, width=width,
                    model=req.model or prep.label,
                    concept=None if applied is None else {"path": applied.path, "format": applied.format,
                                                          "scale": req.concept_scale},
                    scheduler=type(pipe.scheduler).__name__, device=req.device, dtype=req.dtype, result=result)
    return result, card


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
        current[1].remove()
        del _applied[pipe]
    if key is None:
        return None
    from personalize.concepts.apply import apply_concept
    applied = apply_concept(pipe, path, phrase=phrase, scale=scale)
    _applied[pipe] = (key, applied)
    return applied
