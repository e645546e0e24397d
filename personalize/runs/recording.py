"""What the app does with runs, with no UI in it: parse what a user typed (JSON
parameters, slider values), record a finished run (score, write, add to the history) and
compare several samplers on one prompt and seed."""

from __future__ import annotations

import json
import tempfile

from personalize.errors import UserError
from personalize.runs.request import cost
from personalize.runs.runcard import plain, write_run
from personalize.sampling.samplers import SAMPLERS


def parameter_names() -> list[str]:
    """Every sampler parameter name, each once, in the samplers' order (the union the
    app's sliders are made of)."""
    names = []
    for spec in SAMPLERS.values():
        names += [p.name for p in spec.params if p.name not in names]
    return names


PARAM_NAMES = parameter_names()


def first_param(name: str):
    """The first sampler parameter with this name (its kind, range and help)."""
    return next(p for s in SAMPLERS.values() for p in s.params if p.name == name)


def params_from(sampler: str, values) -> dict:
    """The parameters of `sampler` from one value per name of PARAM_NAMES (the sliders),
    step counts and integers as int."""
    spec = SAMPLERS.get(sampler)
    if spec is None:
        return {}
    own = {p.name: p for p in spec.params}
    return {name: int(value) if own[name].kind in ("steps", "int") else value
            for name, value in zip(PARAM_NAMES, values) if name in own}


MAX_JSON_CHARS = 20_000  # room for per-step lists of every parameter over 150 steps


def parse_json_object(text: str, what: str) -> dict:
    """A JSON object typed by a user ("" is {}); UserError names `what` otherwise (too
    long, too deeply nested and not text included)."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return {}
    if not isinstance(text, str):
        raise UserError(f"{what}: {type(text).__name__} given, a JSON object as text expected")
    if len(text) > MAX_JSON_CHARS:
        raise UserError(f"{what}: {len(text)} characters, over the limit of {MAX_JSON_CHARS}")
    try:
        value = json.loads(text)
    except RecursionError:
        raise UserError(f"{what}: nested too deeply") from None
    except ValueError as e:
        raise UserError(f"{what}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what}: must be a JSON object, got {type(value).__name__}")
    return value


def parse_compare_params(text: str, samplers: list[str]) -> dict:
    """The per-sampler parameters of a comparison: a JSON object {sampler: {param: value}}."""
    params = parse_json_object(text, "parameters")
    if not all(isinstance(v, dict) for v in params.values()):
        raise UserError('parameters: give a JSON object like {"mixed": {"w_s": 2}}')
    extra = sorted(set(params) - set(samplers))
    if extra:
        raise UserError(f"parameters: {extra[0]!r} is not one of the compared samplers ({', '.join(samplers)})")
    return params


def format_score(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def record_run(lab, concept, history: list, finished) -> tuple[dict, str]:
    """Score a finished run, write its images and run card to a fresh temporary folder the
    app serves, and append the card to `history`. Returns the card (its `images` the
    served paths) and the path of its run.json."""
    card = plain(lab.score(concept, finished.images, finished.card))  # NaN scores as null
    out = tempfile.mkdtemp(prefix="personalize-run-")
    names = write_run(out, card, finished.images)["images"]
    card["images"] = [f"{out}/{name}" for name in names]
    history.append(card)
    return card, f"{out}/run.json"


def check_samplers(samplers) -> list[str]:
    """The samplers of a comparison: names of known samplers, each once."""
    if isinstance(samplers, str):
        samplers = [samplers]
    if not isinstance(samplers, (list, tuple)) or not all(isinstance(s, str) for s in samplers):
        raise UserError("compare: give a list of sampler names")
    if not samplers:
        raise UserError("compare: choose at least one sampler")
    if len(samplers) > len(SAMPLERS):
        raise UserError(f"compare: {len(samplers)} samplers given; there are only {len(SAMPLERS)}")
    twice = sorted({s for s in samplers if samplers.count(s) > 1})
    if twice:
        raise UserError(f"compare: {twice[0]!r} is given more than once; name each sampler once")
    return list(samplers)


def compare_runs(lab, concept, history: list, prompt, samplers, params_text, seed, steps, size=None):
    """Run every sampler on one prompt and seed; returns (gallery items, cards). Every
    input is checked (UserError) before anything runs."""
    samplers = check_samplers(samplers)
    params = parse_compare_params(params_text, samplers)
    preps = [lab.request(concept, prompt, name, params.get(name, {}), seed=seed, steps=steps,
                         size=size or None) for name in samplers]
    need = sum(cost(p, lab.default_size) for p in preps)
    if need > lab.limits.max_cost:
        raise UserError(f"compare: these {len(preps)} runs need {need:,} denoiser row-pixels together, over this "
                        f"server's limit of {lab.limits.max_cost:,}; compare fewer samplers or use fewer steps")
    items, cards = [], []
    for name, prep in zip(samplers, preps):
        card, _ = record_run(lab, concept, history, lab.generate(prep))
        cards.append(card)
        items.append((card["images"][0], f"{name}: {card['denoiser_rows']} rows, {card['seconds']:.1f} s, "
                                         f"IS {format_score(card['is'])}, TS {format_score(card['ts'])}"))
    return items, cards
