"""The sweep configuration (docs/interfaces.md): YAML in, a checked `SweepConfig` out.

Every mistake is a UserError naming the key, raised before anything is loaded or
generated: unknown keys at any level, unknown prompt sets and samplers, parameters the
sampler does not take, empty lists and grids, missing or unreadable reference images.

On a world model (a folder with `world.json`, docs/world.md) the defaults follow the
world: its prompt set, its metric model for CLIP (no DINO), and a concept named like one
of its concepts takes that concept's weights, phrase, class and references.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from personalize.errors import UserError
from personalize.evaluation.metrics import MetricSettings
from personalize.evaluation.prompt_sets import SUBJECTS, resolve_prompts
from personalize.images import IMAGE_SUFFIXES, image_files
from personalize.models.loading import concept_meta
from personalize.sampling.samplers import SAMPLERS, configure
from personalize.world.paths import is_world

TOP_KEYS = ("model", "concepts", "prompts", "seeds", "steps", "images_per_prompt", "samplers",
            "negative_prompt", "scheduler", "height", "width", "device", "dtype", "metrics", "batch_images", "runtime")
CONCEPT_KEYS = ("name", "phrase", "superclass", "references", "weights", "model", "prompts")
BENCH_KEYS = ("dreambench", "subjects", "phrase", "weights", "model", "prompts")
SAMPLER_KEYS = ("name", "points", "grid")
METRIC_KEYS = ("clip", "dino", "dino_weights", "allow_random")
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class SweepConcept:
    name: str
    phrase: str
    superclass: str
    references: tuple[str, ...]
    prompts: tuple[str, ...]
    weights: str | None = None
    model: str | None = None     # overrides the sweep's model (a DreamBooth pipeline per concept)


@dataclass(frozen=True)
class Setting:
    """One sampler setting: every parameter, defaults filled, numbers in one canonical form."""
    sampler: str
    params: str  # canonical JSON: the row key and the `params` column
    label: str   # short, file-name-safe

    @property
    def values(self) -> dict:
        return json.loads(self.params)


@dataclass(frozen=True)
class SweepConfig:
    model: str | None
    concepts: tuple[SweepConcept, ...]
    points: tuple[Setting, ...]
    seeds: tuple[int, ...]
    steps: int = 50
    images_per_prompt: int = 1
    negative_prompt: str = ""
    scheduler: str = "model"
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    metrics: Any = None  # metrics.MetricSettings, device not yet filled in
    batch_images: int = 32  # images per denoiser batch (jobs of one sampler point go together)
    world: bool = False     # the model is a world: rows get the judge's fidelity columns
    runtime: str = "torch"  # where the denoiser runs (sampling/runtime.py); checked with each request


def load_config(path: str | Path, *, device: str | None = None, dtype: str | None = None) -> SweepConfig:
    """Read and check a sweep YAML file: every error is a UserError naming the key,
    raised before anything is loaded or generated."""

    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep: the config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"sweep: {path} is not valid YAML ({' '.join(str(e).split())})") from None
    return parse_config(raw, base=path.parent, device=device, dtype=dtype)


def parse_config(raw, *, base: str | Path = ".", device: str | None = None, dtype: str | None = None) -> SweepConfig:
    base = Path(base).resolve()  # paths in the config are relative to its folder
    raw = _mapping(raw, "the config", TOP_KEYS)
    steps = _whole(raw.get("steps", 50), "steps", 1)
    model = raw.get("model")
    if model is not None:
        model = _path_or_id(_text(model, "model"), base)
    world = model is not None and is_world(model)
    default_prompts = raw.get("prompts", "world" if world else "dreambench")
    concepts = _concepts(_list(raw.get("concepts"), "concepts"), base, model, default_prompts)
    points = _points(_list(raw.get("samplers"), "samplers"), steps, configure)
    seeds = raw.get("seeds", [0])
    seeds = _list([seeds] if isinstance(seeds, int) else seeds, "seeds")
    seeds = tuple(dict.fromkeys(_whole(s, f"seeds[{k}]", 0) for k, s in enumerate(seeds)))
    metrics = _metric_settings(_mapping(raw.get("metrics") or {}, "metrics", METRIC_KEYS), base,
                               world=model if world else None)
    size = {k: None if raw.get(k) is None else _whole(raw[k], k, 1) for k in ("height", "width")}
    return SweepConfig(
        model=model, concepts=concepts, points=points, seeds=seeds, steps=steps,
        images_per_prompt=_whole(raw.get("images_per_prompt", 1), "images_per_prompt", 1),
        negative_prompt=_text(raw.get("negative_prompt", ""), "negative_prompt", empty=True),
        scheduler=_text(raw.get("scheduler", "model"), "scheduler"), **size,
        device=device or _text(raw.get("device", "auto"), "device"),
        dtype=dtype or _text(raw.get("dtype", "float32"), "dtype"),
        metrics=metrics,
        batch_images=_whole(raw.get("batch_images", 32), "batch_images", 1),
        world=world,
        runtime=_text(raw.get("runtime", "torch"), "runtime"),
    )


def _metric_settings(raw: dict, base: Path, world: str | None = None):
    """The metric settings; on a world, CLIP defaults to the world's metric model and DINO
    to none (the world's images are 64 px, and it has no DINO of its own)."""

    given = {"clip": str(Path(world) / "metric"), "dino": "none"} if world else {}
    for key in ("clip", "dino", "dino_weights"):
        if raw.get(key) is not None:
            value = _text(raw[key], f"metrics.{key}")
            given[key] = value if key == "dino" else _path_or_id(value, base)
    if "allow_random" in raw:
        given["allow_random"] = raw["allow_random"]
    return MetricSettings(**given).check()


def _mapping(value, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping of keys ({', '.join(allowed)}), got {type(value).__name__}")
    unknown = [k for k in value if k not in allowed]
    if unknown:
        prefix = "" if where == "the config" else f"{where}: "
        raise UserError(f"{prefix}unknown key {unknown[0]!r}; accepted: {', '.join(allowed)}")
    return value


def _list(value, where: str) -> list:
    if value is None:
        raise UserError(f"{where}: missing; give a list")
    if not isinstance(value, list):
        raise UserError(f"{where}: expected a list, got {type(value).__name__}")
    if not value:
        raise UserError(f"{where}: the list is empty")
    return value


def _whole(value, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{where}: {value!r} must be a whole number >= {low}")
    return value


def _text(value, where: str, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise UserError(f"{where}: {value!r} must be a non-empty text")
    return value


def _path_or_id(value: str, base: Path) -> str:
    """A path relative to the config file when it exists there; else as written (a hub id)."""
    candidate = base / Path(value).expanduser()
    return str(candidate) if not Path(value).expanduser().is_absolute() and candidate.exists() else value


def _concepts(entries: list, base: Path, model: str | None, default_prompts) -> tuple[SweepConcept, ...]:
    concepts = []
    for k, entry in enumerate(entries):
        where = f"concepts[{k}]"
        if isinstance(entry, dict) and "dreambench" in entry:
            concepts += _bench_concepts(_mapping(entry, where, BENCH_KEYS), where, base, model, default_prompts)
        else:
            concepts.append(_concept(_mapping(entry, where, CONCEPT_KEYS), where, base, model, default_prompts))
    names = [c.name for c in concepts]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"concepts: the name {dup!r} is used twice")
    return tuple(concepts)


def _concept(entry: dict, where: str, base: Path, model: str | None, default_prompts) -> SweepConcept:
    """One concept; phrase, superclass and references default to its model's concept.json
    (the demo model has one)."""

    name = _text(entry.get("name"), f"{where}.name")
    if not SAFE_NAME.match(name):
        raise UserError(f"{where}.name: {name!r} may use only letters, digits, '_', '.', '-' (it names folders)")
    where = f"{where} ({name})"
    concept_model = _path_or_id(_text(entry["model"], f"{where}.model"), base) if "model" in entry else None
    if concept_model is None and model is None:
        from personalize.models.demo import ensure_demo_model
        model = str(ensure_demo_model())
    folder = Path(concept_model or model)
    weights = entry.get("weights")
    if weights is not None:
        weights = _path_or_id(_text(weights, f"{where}.weights"), base)
    world_concept = folder / "concepts" / name
    if weights is None and is_world(folder) and world_concept.is_dir():
        weights = str(world_concept)  # the world's own concept of that name
    meta = concept_meta(folder, weights)
    phrase = _text(entry.get("phrase", meta.get("phrase")), f"{where}.phrase")
    superclass = _text(entry.get("superclass", meta.get("superclass")), f"{where}.superclass")
    references = entry.get("references", meta.get("references"))
    if references is None:
        raise UserError(f"{where}.references: missing; give a list of image files or a folder")
    prompts = resolve_prompts(entry.get("prompts", default_prompts), name=name, superclass=superclass,
                              where=f"{where}.prompts" if "prompts" in entry else "prompts")
    return SweepConcept(name, phrase, superclass, _references(references, f"{where}.references", base),
                        tuple(dict.fromkeys(prompts)), weights, concept_model)


def _bench_concepts(entry: dict, where: str, base: Path, model: str | None, default_prompts) -> list[SweepConcept]:
    """The benchmark's subjects from its dataset folder (one subfolder of images per
    subject). `phrase`, `weights` and `model` may name the subject as {name} and its class
    noun as {class}."""

    root = base / Path(_text(entry["dreambench"], f"{where}.dreambench")).expanduser()
    if not root.is_dir():
        raise UserError(f"{where}.dreambench: the dataset folder {root} does not exist")
    subjects = entry.get("subjects", "all")
    if subjects == "all":
        subjects = list(SUBJECTS)
    for s in _list(subjects, f"{where}.subjects"):
        if s not in SUBJECTS:
            raise UserError(f"{where}.subjects: unknown subject {s!r}; accepted: all, or names among "
                            f"{', '.join(SUBJECTS)}")
    out = []
    for s in subjects:
        concept = {"name": s, "superclass": SUBJECTS[s], "references": str(root / s),
                   "phrase": _fill(entry.get("phrase", "sks {class}"), s, SUBJECTS[s])}
        for key in ("weights", "model"):
            if key in entry:
                concept[key] = _fill(_text(entry[key], f"{where}.{key}"), s, SUBJECTS[s])
        if "prompts" in entry:
            concept["prompts"] = entry["prompts"]
        out.append(_concept(concept, f"{where}[{s}]", base, model, default_prompts))
    return out


def _fill(pattern: str, name: str, noun: str) -> str:
    return pattern.replace("{name}", name).replace("{class}", noun)


def _references(value, where: str, base: Path) -> tuple[str, ...]:
    """Reference image files (a list, or a folder of images); each must exist and open."""

    if isinstance(value, str):
        folder = base / Path(value).expanduser()
        if not folder.is_dir():
            raise UserError(f"{where}: the folder {folder} does not exist")
        files = image_files(folder)
        if not files:
            raise UserError(f"{where}: the folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    else:
        files = [base / Path(_text(p, f"{where}[{k}]")).expanduser() for k, p in enumerate(_list(value, where))]
    for f in files:
        if not f.is_file():
            raise UserError(f"{where}: the reference image {f} does not exist")
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for a file that is not an image
            raise UserError(f"{where}: {f} is not a readable image ({type(e).__name__})") from None
    return tuple(str(f.resolve()) for f in files)


def _points(entries: list, steps: int, configure) -> tuple[Setting, ...]:
    points = []
    for k, entry in enumerate(entries):
        entry = _mapping(entry, f"samplers[{k}]", SAMPLER_KEYS)
        name = _text(entry.get("name"), f"samplers[{k}].name")
        if name not in SAMPLERS:
            raise UserError(f"samplers[{k}].name: unknown sampler {name!r}; accepted: {' | '.join(SAMPLERS)}")
        where = f"samplers[{k}] ({name})"
        if "points" not in entry and "grid" not in entry:
            raise UserError(f"{where}: give points (a list of parameter mappings) or grid (parameter -> values)")
        given = []
        if "points" in entry:
            for j, p in enumerate(_list(entry["points"], f"{where}.points")):
                given.append(_mapping(p, f"{where}.points[{j}]", tuple(q.name for q in SAMPLERS[name].params)))
        if "grid" in entry:
            given += grid_points(entry["grid"], f"{where}.grid")
        for params in given:
            try:
                config = configure(name, params, steps)
            except UserError as e:
                raise UserError(f"{where}, point {json.dumps(params)}: {e}") from None
            points.append(make_point(config))
    return tuple(dict.fromkeys(points))  # the same point twice is one point


def grid_points(grid, where: str) -> list[dict]:
    """Every combination of a grid {param: [values]}, in the order written."""
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{where}: the grid is empty; give parameter -> list of values")
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{name}: the grid has no values for {name}; give a non-empty list")
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def make_point(config) -> Setting:
    """Canonical parameters: whole-number kinds as int, the rest as float, so that `7` and
    `7.0` are one point (and one row key)."""

    params = {}
    for p in SAMPLERS[config.name].params:
        v = config.params[p.name]
        if p.kind in ("steps", "int"):
            v = int(v)
        elif p.kind != "choice":
            v = [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)
        params[p.name] = v
    text = json.dumps(params)
    label = ",".join(f"{k}={v}" for k, v in params.items())
    if len(label) > 90 or not re.fullmatch(r"[A-Za-z0-9_.,=-]+", label):  # per-step lists and the like
        label = "p" + hashlib.sha1(text.encode()).hexdigest()[:12]
    return Setting(config.name, text, label)
