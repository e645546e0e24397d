"""`sweep CONFIG --out DIR`: a resumable hyperparameter sweep over concepts x prompts x
seeds x sampler points, with the study's metrics, one results row per image.

Unit of work: one job = one (concept, prompt, sampler point, seed). Jobs of the same
concept and sampler point share one plan, so they go through the denoiser together: a
batch is up to `batch_images` images of consecutive jobs of one (concept, point), fixed
by the grid alone (a rerun forms the same batches, so it gives the same numbers). The
pipeline stays loaded, a batch's images are decoded once, saved once and scored in one
call. A batch's rows are appended to this process's part file (flushed and synced) as
soon as they are scored, so a crash loses at most the batch in flight. Every run first
reads the rows already written and computes only the batches with missing rows.

On a world model (docs/world.md) each row also carries the judge's verdicts from the
pixels: `concept_fidelity` (the image shows the concept, 0/1) and `context_fidelity`
(its context, or for a colour prompt its colour, is the prompt's, 0/1). Under `accelerate launch` the missing jobs are dealt round-robin to the
processes; at the end the main process merges every part into `results.csv`, one row
per key, in the order of the grid.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from personalize.errors import UserError
from personalize.evaluation.metrics import image_scores, load_metric_models
from personalize.evaluation.sweep_config import Setting, SweepConcept, SweepConfig
from personalize.models.loading import check_model, load_pipeline, release_pipelines
from personalize.prompts import prompt_pair, remove_concept
from personalize.runs.request import Request, check, use_concept
from personalize.sampling.batched import Item, run_many
from personalize.world.judge import judge
from personalize.world.scene import fill

RESULTS = "results.csv"
PARTS = "parts"
LOCK = "sweep.json"
KEY = ("concept", "prompt", "sampler", "params", "seed", "image")
COLUMNS = ("concept", "prompt", "seed", "image", "sampler", "params", "point", "is", "ts", "ts_class", "dino",
           "concept_fidelity", "context_fidelity",
           "rows", "seconds", "image_path", "steps", "model", "concept_weights", "concept_phrase", "superclass",
           "ts_prompt", "ts_class_prompt", "metric_models", "random_weights")
TIMING = ("seconds",)  # the only columns that differ between two runs of the same rows


# ---------------------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True)
class Job:
    concept: SweepConcept
    prompt: str
    point: Setting
    seed: int

    def key(self, image: int) -> tuple[str, ...]:
        return (self.concept.name, self.prompt, self.point.sampler, self.point.params, str(self.seed), str(image))


def jobs_of(config: SweepConfig) -> list[Job]:
    """The grid in its fixed order: concept-major (one pipeline and one set of references
    at a time), then sampler point, prompt, seed."""
    return [Job(c, prompt, point, seed) for c in config.concepts for point in config.points
            for prompt in c.prompts for seed in config.seeds]


def batches_of(config: SweepConfig) -> list[list[Job]]:
    """The grid's jobs in batches: consecutive jobs of one (concept, point), at most
    `batch_images` images each (at least one job). A function of the config alone."""
    per = max(1, config.batch_images // config.images_per_prompt)
    out = []
    for c in config.concepts:
        for point in config.points:
            jobs = [Job(c, prompt, point, seed) for prompt in c.prompts for seed in config.seeds]
            out += [jobs[k:k + per] for k in range(0, len(jobs), per)]
    return out


# ---------------------------------------------------------------------------------------
# Rows on disk


def read_rows(path: Path) -> list[dict]:
    """The rows of one CSV file written by this module. A last line without its newline
    is a write cut short by a crash: it is dropped."""
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return list(csv.DictReader(text.splitlines(keepends=True)))


def part_files(out: Path) -> list[Path]:
    return sorted((out / PARTS).glob("*.csv")) if (out / PARTS).is_dir() else []


def existing_rows(out: Path) -> tuple[dict[tuple, dict], list[Path]]:
    """Every finished row (results.csv first, then the parts), one per key, and the part
    files read."""
    rows: dict[tuple, dict] = {}
    parts = part_files(out)
    for path in ([out / RESULTS] if (out / RESULTS).is_file() else []) + parts:
        for row in read_rows(path):
            rows.setdefault(tuple(row.get(k, "") for k in KEY), row)
    return rows, parts


def save_image(image, path: Path) -> None:
    """Write a PNG all at once, before its row: a temporary file in the same folder, synced
    and renamed into place, then the folder synced. After a crash the path holds the whole
    image or nothing (and then resume redoes it), never a truncated one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            image.save(f, format="PNG")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that the renames in it survive a power cut (where the system allows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class PartWriter:
    """This process's part file, new for every run: rows appended, flushed and synced job by
    job. A file is never reopened, so a line cut short by a crash stays the last one."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.file = open(path, "x", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, COLUMNS, lineterminator="\n")
        self.writer.writeheader()
        self._sync()

    def write(self, rows: list[dict]) -> None:
        self.writer.writerows(rows)
        self._sync()

    def _sync(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def merge(out: Path, order: list[tuple]) -> int:
    """Fold results.csv and every part into one results.csv: one row per key, rows of the
    grid in grid order, older rows outside the grid kept after them. Written to a
    temporary file and renamed, then the parts it read are removed."""
    rows, parts = existing_rows(out)
    rank = {key: i for i, key in enumerate(order)}
    keys = sorted(rows, key=lambda k: (0, rank[k]) if k in rank else (1, 0))  # sort is stable
    tmp = out / f".{RESULTS}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows[k] for k in keys)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(out / RESULTS)
    sync_folder(out)
    for p in parts:
        p.unlink(missing_ok=True)
    if (out / PARTS).is_dir() and not any((out / PARTS).iterdir()):
        (out / PARTS).rmdir()
    return len(keys)


def check_lock(out: Path, settings: dict, *, write: bool) -> None:
    """A sweep folder holds one experiment: the settings that change every number (model,
    steps, size, metric models, each concept's identity) must match those it was started
    with. New concepts, prompts, points and seeds are welcome."""
    path = out / LOCK
    if path.is_file():
        old = json.loads(path.read_text())
        for key, value in settings.items():
            if key == "concepts" or key not in old or old[key] == value:
                continue
            raise UserError(f"sweep: {out} was made with {key} = {old[key]!r}, this config gives {value!r}; "
                            "use a new --out for a new experiment")
        for name, value in settings["concepts"].items():
            before = old.get("concepts", {}).get(name)
            if before is not None and before != value:
                field_ = next(k for k in value if before.get(k) != value[k])
                raise UserError(f"sweep: concept {name!r} in {out} was made with {field_} = {before.get(field_)!r}, "
                                f"this config gives {value[field_]!r}; use a new --out or a new concept name")
        settings = dict(settings, concepts={**old.get("concepts", {}), **settings["concepts"]})
    if write:
        tmp = out / f".{LOCK}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(settings, indent=2) + "\n")
        tmp.replace(path)


def lock_settings(config: SweepConfig, metric_models: str) -> dict:
    return {
        "model": config.model, "steps": config.steps, "height": config.height, "width": config.width,
        "scheduler": config.scheduler, "negative_prompt": config.negative_prompt, "metric_models": metric_models,
        "concepts": {c.name: {"phrase": c.phrase, "superclass": c.superclass, "weights": c.weights,
                              "model": c.model, "references": [Path(r).name for r in c.references]}
                     for c in config.concepts},
    }


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not ((out / LOCK).is_file() or (out / RESULTS).is_file()):
        raise UserError(f"--out: {out} is not empty and is not a sweep folder; choose a new folder")


# ---------------------------------------------------------------------------------------
# Running


@dataclass
class Summary:
    jobs: int = 0            # jobs in the grid
    done_before: int = 0     # rows that were already there
    images: int = 0          # images this process generated
    rows: int = 0            # rows in results.csv after the merge (main process)
    seconds: float = 0.0
    out: str = ""
    random_weights: bool = False


def request_for(config: SweepConfig, job: Job, device: str, num_images: int):
    return Request(prompt=job.prompt, sampler=job.point.sampler, params=job.point.values,
                   model=job.concept.model or config.model, concept=job.concept.weights,
                   concept_phrase=job.concept.phrase, superclass=job.concept.superclass,
                   negative_prompt=config.negative_prompt, steps=config.steps, seed=job.seed,
                   num_images=num_images, height=config.height, width=config.width, device=device,
                   dtype=config.dtype, scheduler=config.scheduler, runtime=config.runtime)


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_jobs(config: SweepConfig, device: str) -> None:
    """Everything `runs.check` can say, once per (concept, sampler point), and every
    prompt of every concept: all before the first image."""

    for c in config.concepts:
        for template in c.prompts:
            prompt_pair(template, c.phrase, c.superclass)
        for point in config.points:
            try:
                check(request_for(config, Job(c, c.prompts[0], point, config.seeds[0]), device,
                                  config.images_per_prompt))
            except UserError as e:
                raise UserError(f"concept {c.name!r}, sampler {point.sampler} {point.label}: {e}") from None


def process_state(device: str):
    """accelerate's view of the processes (one, unless started by `accelerate launch`)."""

    # Processes that finish their share wait at the final barrier for the slowest one;
    # the default timeout (minutes) is far too short for a sweep of thousands of images.
    return PartialState(cpu=device == "cpu", timeout=timedelta(hours=float(os.environ.get(
        "PERSONALIZE_SWEEP_TIMEOUT_HOURS", "72"))))


def run_sweep(config: SweepConfig, out: str | Path, *, progress: bool = True, fail_after: int | None = None) -> Summary:
    """Compute the missing rows of `config` into `out`. `fail_after` (tests) raises after
    that many images were generated, before their rows are written, like a crash."""

    started = time.perf_counter()
    out = Path(out)
    check_out(out)
    device = resolve_device(config.device)
    check_jobs(config, device)
    state = process_state(device)  # sets this process's GPU before anything is loaded
    metric_device = str(state.device) if device == "cuda" else device
    models = load_metric_models(replace(config.metrics, device=metric_device))
    out.mkdir(parents=True, exist_ok=True)
    check_lock(out, lock_settings(config, models.describe()), write=state.is_main_process)

    done, _ = existing_rows(out)
    state.wait_for_everyone()  # nobody writes a row before every process has read the same `done`
    jobs, n = jobs_of(config), config.images_per_prompt
    todo = []
    for batch in batches_of(config):
        missing = [(j, [k for k in range(n) if j.key(k) not in done]) for j in batch]
        if any(m for _, m in missing):
            todo.append(missing)
    mine = todo[state.process_index::state.num_processes]  # round-robin over batches
    summary = Summary(jobs=len(jobs), done_before=len(done), out=str(out), random_weights=models.random_weights)
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-p{state.process_index}-{uuid.uuid4().hex[:8]}.csv"
    part = PartWriter(out / PARTS / name)
    bar = _progress(sum(len(m) for batch in mine for _, m in batch), progress and state.is_main_process, state)
    cache = {}
    try:
        for batch in mine:
            _release_other_pipelines(batch[0][0].concept.model or config.model)
            rows = run_batch(config, batch, device, models, cache, out)
            summary.images += len(rows)
            if fail_after is not None and summary.images >= fail_after:
                raise RuntimeError(f"sweep: stopped after {summary.images} images (fail_after, a test hook)")
            part.write(rows)
            bar.update(len(rows))
    finally:
        bar.close()
        part.close()
    state.wait_for_everyone()
    if state.is_main_process:
        summary.rows = merge(out, [j.key(k) for j in jobs for k in range(n)])
    summary.seconds = time.perf_counter() - started
    return summary


def _progress(total: int, enabled: bool, state):
    desc = "sweep" if state.num_processes == 1 else f"sweep (process 1 of {state.num_processes}, its share)"
    # unit "img": tqdm shows images per second and the time left.
    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def _release_other_pipelines(model: str | None) -> None:
    """Concepts with their own pipeline (DreamBooth folders) come one after another in the
    grid: drop the other pipelines from the loading cache, or thirty of them would fill the GPU."""

    if model is None:
        return
    if release_pipelines(keep=check_model(model)):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_batch(config: SweepConfig, batch: list[tuple[Job, list[int]]], device: str, models, cache: dict,
              out: Path) -> list[dict]:
    """One batch (jobs of one concept and sampler point, each with its missing images):
    every image through the denoiser together, the missing ones saved and scored, their
    rows."""

    n = config.images_per_prompt
    first = batch[0][0]
    prep = check(request_for(config, first, device, n))
    req = prep.request
    pipe = load_pipeline(prep.model, device=req.device, dtype=req.dtype, scheduler=req.scheduler)
    use_concept(pipe, req.concept, prep.concept_phrase, req.concept_scale)

    items = [Item(prompt_pair(job.prompt, prep.concept_phrase, prep.superclass), job.seed) for job, _ in batch]
    results = run_many(pipe, items, prep.config, num_images=n, height=config.height, width=config.width,
                       negative_prompt=config.negative_prompt, concept_phrase=prep.concept_phrase,
                       runtime=req.runtime)
    model_label = req.model or f"demo ({prep.model})"
    wanted = [(job, k, result) for (job, missing), result in zip(batch, results) for k in missing]
    paths = []
    for job, k, result in wanted:
        folder = Path("images") / job.concept.name / job.point.sampler / job.point.label / prompt_slug(job.prompt)
        (out / folder).mkdir(parents=True, exist_ok=True)
        path = folder / f"s{job.seed}_{k:02d}.png"
        save_image(result.images[k], out / path)
        paths.append(path)
    images = [result.images[k] for _, k, result in wanted]
    gen_clip, gen_dino = models.clip_images(images), models.dino_images(images)  # one call for the batch
    rows = []
    for i, ((job, k, result), path) in enumerate(zip(wanted, paths)):
        texts, scores = score_embedded(models, job, gen_clip[i:i + 1],
                                       None if gen_dino is None else gen_dino[i:i + 1], cache)
        row = {
            "concept": job.concept.name, "prompt": job.prompt, "seed": job.seed, "sampler": job.point.sampler,
            "params": job.point.params, "point": job.point.label, "rows": result.rows // n,
            "seconds": repr(result.seconds / n), "steps": config.steps, "model": model_label,
            "concept_weights": job.concept.weights or "", "concept_phrase": job.concept.phrase,
            "superclass": job.concept.superclass, "ts_prompt": texts[0], "ts_class_prompt": texts[1],
            "metric_models": models.describe(), "random_weights": str(models.random_weights).lower(), "dino": "",
            "image": k, "image_path": path.as_posix(), **{m: repr(v[0]) for m, v in scores.items()},
            "concept_fidelity": "", "context_fidelity": "",
        }
        if config.world:
            row.update(judge_columns(images[i], job))
        rows.append(row)
    return rows


def judge_columns(image, job: Job) -> dict:
    """The world judge's verdicts on one image (docs/world.md): concept shown, and context
    (or colour, for a colour prompt) as the prompt says; 0 or 1."""

    v = judge(image, fill(job.prompt, job.concept.phrase))
    context_ok = v.colour_ok if v.colour_ok is not None else v.context_ok
    return {"concept_fidelity": "" if v.concept is None else int(bool(v.concept)),
            "context_fidelity": int(bool(context_ok))}


def score_embedded(models, job: Job, gen_clip, gen_dino, cache: dict):
    """`score` for images already embedded."""

    with_class = prompt_pair(job.prompt, job.concept.phrase, job.concept.superclass).superclass
    texts = (remove_concept(job.prompt), with_class)
    ref_clip, ref_dino = reference_embeddings(models, job.concept, cache)
    ts, ts_class = text_embeddings(models, texts, cache)
    return texts, image_scores(gen_clip, ref_clip, ts, ts_class, gen_dino, ref_dino)


def score(models, job: Job, images: list, cache: dict) -> tuple[tuple[str, str], dict[str, list[float]]]:
    """The TS texts (concept phrase removed; class noun in its place) and the per-image
    scores. Reference and text embeddings are computed once per process."""

    with_class = prompt_pair(job.prompt, job.concept.phrase, job.concept.superclass).superclass
    texts = (remove_concept(job.prompt), with_class)
    ref_clip, ref_dino = reference_embeddings(models, job.concept, cache)
    ts, ts_class = text_embeddings(models, texts, cache)
    scores = image_scores(models.clip_images(images), ref_clip, ts, ts_class, models.dino_images(images), ref_dino)
    return texts, scores


def reference_embeddings(models, concept: SweepConcept, cache: dict):
    key = ("refs", concept.name)
    if key not in cache:
        from PIL import Image

        images = []
        for path in concept.references:
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        cache[key] = (models.clip_images(images), models.dino_images(images))
    return cache[key]


def text_embeddings(models, texts: tuple[str, ...], cache: dict) -> list:
    missing = [t for t in dict.fromkeys(texts) if ("text", t) not in cache]
    if missing:
        for t, e in zip(missing, models.clip_texts(missing)):
            cache[("text", t)] = e
    return [cache[("text", t)] for t in texts]


def prompt_slug(prompt: str) -> str:
    """A folder name for a prompt: its words, shortened, plus a hash so two prompts never
    share a folder."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower().replace("{}", "X")).strip("-")[:48].strip("-")
    return f"{words}-{hashlib.sha1(prompt.encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------
# Command line


def dry_run(config: SweepConfig, out: Path) -> str:
    """Check everything a run checks before its first image, and count the work."""
    check_out(out)
    check_jobs(config, resolve_device(config.device))
    done, _ = existing_rows(out) if out.is_dir() else ({}, [])
    jobs, n = jobs_of(config), config.images_per_prompt
    missing = sum(j.key(k) not in done for j in jobs for k in range(n))
    return (f"{len(config.concepts)} concept(s), {len(config.points)} sampler point(s), {len(config.seeds)} "
            f"seed(s), {n} image(s) per prompt: {len(jobs) * n} images, {missing} still to compute")
