"""`personalize world check`: every acceptance figure of the world, measured on a build.

Each figure is a row: what was measured, its value, the target, whether it holds, and
how many images stand behind it. The judge (pixels only) gives the fidelities, the
world's own metric model gives IS and TS.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from scipy.stats import spearmanr

from ..concepts import apply_concept
from ..errors import UserError
from ..evaluation.metrics import MetricSettings, load_metric_models
from ..prompts import prompt_pair, remove_concept
from ..sampling.engine import run
from ..sampling.samplers import configure
from . import judge as J
from .build import all_captions
from .scene import (
    CLASSES,
    COLOURS,
    CONCEPTS,
    CONTEXT_PROMPTS,
    CONTEXTS,
    fill,
    random_scene,
    reference_scenes,
    render,
    render_batch,
)

STEPS = 25
GUIDANCE = 7.0
SWEEP_W = tuple(range(8))          # w_s = 0..7, w_c = 7 - w_s
CHECK_CONTEXTS = CONTEXT_PROMPTS[:8]


@dataclass(frozen=True)
class Figure:
    name: str
    value: float
    target: str        # ">= 0.95", "<= 0.4", ...
    images: int

    @property
    def ok(self) -> bool:
        op, bound = self.target.split()
        value = float(self.value)
        if value != value:   # NaN: e.g. a Spearman of a constant series holds nothing
            return False
        return bool(value >= float(bound) if op == ">=" else value <= float(bound))

    def row(self) -> dict:
        value = float(self.value) if self.value is not None else float("nan")
        return {"figure": self.name, "value": None if value != value else round(value, 4), "target": self.target,
                "ok": self.ok, "images": int(self.images)}


# ---------------------------------------------------------------------------- loading

REQUIRED = {"model_index.json": "the pipeline index", "unet": "the denoiser", "vae": "the autoencoder",
            "text_encoder": "the text encoder", "tokenizer": "the tokenizer", "scheduler": "the scheduler",
            "metric": "the metric model", "world.json": "the world record"}


def check_world_folder(folder: str | Path) -> Path:
    """A clear error naming the first missing part, before anything is loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"world: {folder} is not a folder")
    if not (folder / "world.json").is_file() and not (folder / "model_index.json").is_file():
        raise UserError(f"world: {folder} is not a world (no world.json, no model_index.json)")
    for part, what in REQUIRED.items():
        if not (folder / part).exists():
            raise UserError(f"world: {folder} is missing {what} ({part})")
    for name in CONCEPTS:
        if not (folder / "concepts" / name).is_dir():
            raise UserError(f"world: {folder} is missing the concept {name!r} (concepts/{name})")
    return folder


def load_world_pipeline(folder: Path):
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def world_metric_settings(folder: str | Path, device: str = "cpu") -> MetricSettings:
    """Scores on a world: its own CLIP-style metric model (the metrics code's `clip: FOLDER`
    setting), never random weights, and no DINO (it has none of its own)."""
    return MetricSettings(clip=str(Path(folder) / "metric"), dino="none", allow_random=False, device=device)


def load_world_metric(folder: Path):
    """The world's CLIP through the metrics code's own loader."""

    return load_metric_models(world_metric_settings(folder))


def _pil(images) -> list:
    return [im if hasattr(im, "convert") else Image.fromarray(np.asarray(im)) for im in images]


# ---------------------------------------------------------------------------- the figures

def metric_zero_shot(metric, n: int, seed: int) -> list[Figure]:
    """Zero-shot over every fully specified caption: is the best caption's colour, class
    and context the image's?"""

    captions, labels = all_captions()
    text = metric.clip_texts(captions)
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    best = (metric.clip_images(_pil(render_batch(scenes))) @ text.T).argmax(1).tolist()
    hits = np.array([[labels[b][0] == s.cls, labels[b][1] == s.colour, labels[b][2] == s.context]
                     for b, s in zip(best, scenes)])
    return [Figure("metric model: zero-shot colour", hits[:, 1].mean(), ">= 0.95", n),
            Figure("metric model: zero-shot class", hits[:, 0].mean(), ">= 0.90", n),
            Figure("metric model: zero-shot context", hits[:, 2].mean(), ">= 0.95", n)]


def base_model(pipe, n: int, seed: int, batch: int = 50, steps: int = STEPS) -> list[Figure]:
    """The base model on random prompts of the captions' form, judged from pixels."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        cls, colour = CLASSES[rng.integers(len(CLASSES))], list(COLOURS)[rng.integers(len(COLOURS))]
        context = CONTEXTS[list(CONTEXTS)[rng.integers(len(CONTEXTS))]]
        prompts.append(f"a {colour} {cls}" + (f" {context}" if context else ""))
    verdicts = []
    for i in range(0, n, batch):
        chunk = prompts[i:i + batch]
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=GUIDANCE, height=64, width=64,
                      generator=torch.Generator().manual_seed(seed + i)).images
        verdicts += [J.judge(im, p) for im, p in zip(images, chunk)]
    return [Figure("base model: judge colour", np.mean([v.colour_ok for v in verdicts]), ">= 0.85", n),
            Figure("base model: judge class", np.mean([v.class_ok for v in verdicts]), ">= 0.75", n),
            Figure("base model: judge context", np.mean([v.context_ok for v in verdicts]), ">= 0.90", n)]


def sample(pipe, template: str, concept: dict, sampler: str, params: dict | None, images: int, seed: int,
           steps: int = STEPS):
    pair = prompt_pair(template, concept["phrase"], concept["superclass"])
    return run(pipe, pair, configure(sampler, params or {}, steps=steps), seed=seed, num_images=images,
               height=64, width=64, concept_phrase=concept["phrase"]).images


def concept_samplers(pipe, name: str, images: int, templates, steps: int = STEPS) -> list[Figure]:
    """Concept, superclass and mixed sampling at their defaults: the study's overfit
    concept, the generic class member, and the mix of both."""
    concept = CONCEPTS[name]
    figures = []
    targets = {"concept": (">= 0.8", "<= 0.4"), "superclass": ("<= 0.1", ">= 0.85"), "mixed": (">= 0.6", ">= 0.6")}
    for sampler, (concept_target, context_target) in targets.items():
        verdicts = []
        for k, template in enumerate(templates):
            prompt = fill(template, concept["phrase"])
            verdicts += [J.judge(im, prompt) for im in sample(pipe, template, concept, sampler, None, images, k, steps)]
        fid = J.fidelity(verdicts)
        n = len(verdicts)
        figures += [Figure(f"{name} / {sampler}: concept fidelity", fid["concept_fidelity"], concept_target, n),
                    Figure(f"{name} / {sampler}: context fidelity", fid["context_fidelity"], context_target, n)]
    return figures


def mixed_sweep(pipe, metric, names, images: int, templates, steps: int = STEPS) -> tuple[list[Figure], list[dict]]:
    """w_s = 0..7 with w_c = 7 - w_s: mean TS and context fidelity rise, mean IS and
    concept fidelity fall (Spearman over the eight points)."""

    points = []
    for w_s in SWEEP_W:
        is_, ts, verdicts = [], [], []
        for name in names:
            concept = CONCEPTS[name]
            refs = metric.clip_images(_pil([render(s) for s in reference_scenes(name, n=5, seed=0)]))
            for k, template in enumerate(templates):
                ims = sample(pipe[name], template, concept, "mixed", {"w_s": float(w_s), "w_c": float(7 - w_s)}, images, k,
                             steps)
                emb = metric.clip_images(_pil(ims))
                is_ += (emb @ refs.T).mean(1).tolist()
                ts += (emb @ metric.clip_texts([remove_concept(template)]).T)[:, 0].tolist()
                verdicts += [J.judge(im, fill(template, concept["phrase"])) for im in ims]
        fid = J.fidelity(verdicts)
        points.append({"w_s": w_s, "w_c": 7 - w_s, "is": float(np.mean(is_)), "ts": float(np.mean(ts)),
                       "concept_fidelity": float(fid["concept_fidelity"]),
                       "context_fidelity": float(fid["context_fidelity"]),
                       "images": len(verdicts)})
    n = sum(p["images"] for p in points)
    w = [p["w_s"] for p in points]
    rho = {key: float(spearmanr(w, [p[key] for p in points]).statistic) for key in
           ("ts", "is", "context_fidelity", "concept_fidelity")}
    figures = [Figure("mixed sweep: Spearman(w_s, TS)", rho["ts"], ">= 0.8", n),
               Figure("mixed sweep: Spearman(w_s, IS)", rho["is"], "<= -0.8", n),
               Figure("mixed sweep: Spearman(w_s, context fidelity)", rho["context_fidelity"], ">= 0.8", n),
               Figure("mixed sweep: Spearman(w_s, concept fidelity)", rho["concept_fidelity"], "<= -0.8", n)]
    return figures, points


def run_check(folder: str | Path, *, quick: bool = False, seed: int = 1234, log=print) -> dict:
    """Measure every figure on the world at `folder`; the record is also written to
    `world.json` under `check`. `quick` measures few images at 4 denoising steps: it shows
    that every figure can be measured, not what it is."""

    folder = check_world_folder(folder)
    start = time.time()
    steps = 4 if quick else STEPS
    metric = load_world_metric(folder)
    figures = metric_zero_shot(metric, 60 if quick else 600, seed)
    log(f"metric model done ({time.time() - start:.0f} s)")
    base = load_world_pipeline(folder)
    figures += base_model(base, 8 if quick else 200, seed, steps=steps)
    log(f"base model done ({time.time() - start:.0f} s)")
    templates = CHECK_CONTEXTS[:2] if quick else CHECK_CONTEXTS
    images = 2 if quick else 8
    pipes = {}
    for name in CONCEPTS:
        pipe = load_world_pipeline(folder)
        apply_concept(pipe, folder / "concepts" / name)
        pipes[name] = pipe
        figures += concept_samplers(pipe, name, images, templates, steps)
        log(f"concept {name} done ({time.time() - start:.0f} s)")
    sweep_figures, points = mixed_sweep(pipes, metric, list(CONCEPTS), 2 if quick else 4, templates, steps)
    figures += sweep_figures
    record = {"figures": [f.row() for f in figures], "sweep": points, "all_ok": all(f.ok for f in figures),
              "seconds": round(time.time() - start, 1), "quick": quick, "steps": steps}
    world_json = folder / "world.json"
    if world_json.is_file():
        world = json.loads(world_json.read_text())
        world["check"] = record
        world_json.write_text(json.dumps(world, indent=2))
    return record


def format_table(record: dict) -> str:
    lines = ["| figure | value | target | holds | images |", "|---|---|---|---|---|"]
    for f in record["figures"]:
        value = "n/a" if f["value"] is None else f"{f['value']:.3f}"
        lines.append(f"| {f['figure']} | {value} | {f['target']} | {'yes' if f['ok'] else 'NO'} | {f['images']} |")
    return "\n".join(lines)
