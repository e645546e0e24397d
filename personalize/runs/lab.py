"""What the app needs from the library, with no UI in it: a model choice, streamed runs
that can be stopped, side-by-side comparisons, scores, and a session's chart."""

from __future__ import annotations

import csv
import json
import math
import queue
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
from PIL import Image, UnidentifiedImageError

from personalize.errors import UserError
from personalize.evaluation.metrics import MetricSettings, image_scores, load_metric_models
from personalize.evaluation.pareto import figure
from personalize.evaluation.sweep import KEY
from personalize.models.loading import (
    STUDY_MODEL,
    check_model,
    concept_meta,
    default_model,
    load_pipeline,
    model_size,
    read_concept_json,
    study_model_available,  # noqa: F401  (re-exported)
)
from personalize.prompts import fill, remove_concept
from personalize.runs import request as runs
from personalize.runs.preview import latents_to_rgb, map_to_image
from personalize.sampling.runtime import check_runtime
from personalize.world.check import world_metric_settings
from personalize.world.paths import is_world

MAX_UPLOAD_MB = 256
MAX_REFERENCES = 16                 # reference images per concept
MAX_REFERENCE_PIXELS = 64 * 2 ** 20  # a reference's width x height, read from its header before decoding
REFERENCE_SIDE = 512                 # references are kept at most this large (the metrics see 224)
MAX_RESULTS_MB = 16                  # an uploaded sweep results.csv
MAX_RESULTS_ROWS = 100_000
RESULTS_COLUMNS = ("concept", "prompt", "sampler", "params", "is", "ts", "ts_class", "dino", "random_weights",
                   "concept_fidelity", "context_fidelity")  # what the chart reads; the rest is dropped
CONCEPT_PATH_REFUSED = ("concept path: not a concept this server offers; give a name under its concepts "
                        "folder, or upload a .safetensors file")
PREVIEW_ZOOM = 8  # one latent pixel is 8 image pixels in SD's VAE


@dataclass
class Concept:
    """The concept a user samples: its phrase, superclass, reference images and optional
    fine-tuned weights. Per user (the app keeps it in the session)."""
    phrase: str
    superclass: str
    references: list[str] = field(default_factory=list)
    weights: str | None = None


@dataclass
class StepUpdate:
    step: int
    steps: int
    previews: list           # PIL images, one per image of the run
    attention: list | None   # masked sampling: the attention map per image (PIL, grey)
    mask: list | None        # and the mask


@dataclass
class Finished:
    images: list
    card: dict


class Lab:
    """One base model for the whole app; every run names its own concept and parameters."""

    def __init__(self, model: str | None = None, *, concept: str | None = None, concept_phrase: str | None = None,
                 superclass: str | None = None, device: str = "cpu", dtype: str = "float32",
                 try_study_model: bool = True, concepts_dir: str | None = None, runtime: str = "auto"):
        self.demo = False
        self.reason = "named on the command line"
        if model is None and try_study_model:
            model, self.reason = default_model()
        if model is None:
            from personalize.models.demo import ensure_demo_model
            model, self.reason = str(ensure_demo_model()), "the offline demo model (the study's model was not tried)"
        model = check_model(model)
        self.model, self.device, self.dtype = model, device, dtype
        # The app's runs default to `auto`: ONNX Runtime on a CPU halves a small model's step.
        check_runtime(runtime, device, dtype)
        self.runtime = runtime
        model_meta = read_concept_json(model) if Path(model).is_dir() else None
        self.demo = self.demo or bool((model_meta or {}).get("random_weights"))
        meta = concept_meta(model, concept)   # a trained concept names its own phrase
        phrase = concept_phrase or meta.get("phrase") or "sks dog"
        superclass = superclass or meta.get("superclass") or "dog"
        self.default_concept = Concept(phrase, superclass, list(meta.get("references", [])), concept)
        self.scheduler = "ddim" if model == STUDY_MODEL else "model"
        self.default_size = default_size(model)
        self.world = is_world(model)
        # Scores of every run: on a world, by the world's own metric model (the default CLIP
        # cannot be had offline and would score with random weights).
        self.metrics = (world_metric_settings(model, device) if self.world
                        else MetricSettings(dino="none", device=device))
        self.max_upload_mb = MAX_UPLOAD_MB
        self.limits = runs.Limits.serving()    # what one request may ask for (PERSONALIZE_MAX_*)
        # The only concepts the path box may name: the one given at start and those under
        # `concepts_dir` (`--concepts-dir`); everything else comes as an upload.
        self.concepts_root = Path(concepts_dir).expanduser().resolve() if concepts_dir else None
        self.offered = {str(Path(concept).expanduser().resolve())} if concept else set()
        self._references_dir: str | None = None

    def preload(self):
        """Load the base pipeline now (it is otherwise loaded by the first run). On a ZeroGPU
        Space this must happen when the app starts: each run is a forked worker that
        would load it again."""
        return load_pipeline(self.model, device=self.device, dtype=self.dtype, scheduler=self.scheduler)

    # -- describing ---------------------------------------------------------------------
    def banner(self) -> str:
        if self.demo:
            return ("Running on the **offline demo model**: a small Stable-Diffusion-architecture pipeline with "
                    "random weights (no weights could be had here), so images are noise-like. Every sampler "
                    "runs exactly as on a real model; start with `--model` for real images. "
                    f"Chosen because: {self.reason}.")
        return f"Model: `{self.model}` on {self.device} ({self.dtype}): {self.reason}."

    def served_folders(self) -> list[str]:
        """Folders whose files the app may serve (the default concept's reference images)."""
        return sorted({str(Path(p).parent) for p in self.default_concept.references})

    # -- concepts -----------------------------------------------------------------------
    def check_references(self, paths: list[str]) -> list[str]:
        """Reference images a user gave: at most MAX_REFERENCES, each an image of at most
        MAX_REFERENCE_PIXELS (read from its header, before decoding), decoded once and kept
        as a copy of at most REFERENCE_SIDE pixels a side; returns the copies' paths."""
        if len(paths) > MAX_REFERENCES:
            raise UserError(f"reference images: {len(paths)} given, at most {MAX_REFERENCES}")
        opened = []
        for path in paths:
            name = Path(path).name
            try:
                with Image.open(path) as image:
                    (w, h), big = image.size, image.size[0] * image.size[1] > MAX_REFERENCE_PIXELS
                    if not big:
                        image.verify()
            except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
                raise UserError(f"{name}: not an image file") from None
            if big:
                raise UserError(f"{name}: {w} x {h} pixels is over the limit of "
                                f"{MAX_REFERENCE_PIXELS // 2 ** 20} megapixels")
            opened.append(path)
        return [self._small_copy(path) for path in opened]

    def _small_copy(self, path: str) -> str:
        if self._references_dir is None or not Path(self._references_dir).is_dir():
            self._references_dir = tempfile.mkdtemp(prefix="personalize-refs-")
        try:
            with Image.open(path) as image:
                image.draft("RGB", (REFERENCE_SIDE, REFERENCE_SIDE))  # JPEG: decode at a reduced size
                small = image.convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
            raise UserError(f"{Path(path).name}: not an image file") from None
        small.thumbnail((REFERENCE_SIDE, REFERENCE_SIDE))
        out = Path(self._references_dir) / f"{uuid.uuid4().hex}.png"
        small.save(out)
        return str(out)

    def check_concept_path(self, path: str) -> str:
        """A concept named in the path box: the one given at start, or one under the concepts
        folder (a relative name is taken there). Anything else, missing or not, gets the same
        message, so that the box says nothing about the server's files."""
        if not isinstance(path, str) or not path.strip() or len(path) > 4096 or "\0" in path:
            raise UserError(CONCEPT_PATH_REFUSED)
        text = path.strip()
        try:
            given = Path(text).expanduser()
            if self.concepts_root is not None and not given.is_absolute():
                given = self.concepts_root / given
            resolved = given.resolve()
            inside = self.concepts_root is not None and resolved.is_relative_to(self.concepts_root) \
                and resolved != self.concepts_root
            if not (str(resolved) in self.offered or inside) or not resolved.exists():
                raise UserError(CONCEPT_PATH_REFUSED)
        except (OSError, RuntimeError, ValueError):
            raise UserError(CONCEPT_PATH_REFUSED) from None
        return str(resolved)

    def check_concept_upload(self, path: str) -> Path:
        return check_upload(path, suffixes=(".safetensors",), max_mb=self.max_upload_mb)

    def make_concept(self, phrase: str, superclass: str, *, weights: str | None = None, upload: str | None = None,
                     references: list[str] | None = None, current: Concept | None = None) -> Concept:
        """A checked Concept from what a user typed and uploaded (UserError if anything is off)."""
        phrase, superclass = (phrase or "").strip(), (superclass or "").strip()
        if not phrase:
            raise UserError("concept phrase: empty; write the phrase the concept was trained with, e.g. 'sks dog'")
        if not superclass:
            raise UserError("superclass: empty; write the concept's class noun, e.g. 'dog'")
        if upload:
            weights = str(self.check_concept_upload(upload))
        elif weights:
            weights = self.check_concept_path(weights)
        if weights:
            from personalize.concepts.files import detect_format
            detect_format(weights)
        refs = self.check_references(references) if references else list((current or self.default_concept).references)
        return Concept(phrase, superclass, refs, weights or None)

    # -- running ------------------------------------------------------------------------
    def request(self, concept: Concept, prompt: str, sampler: str, params: dict, *, seed: int = 0,
                steps: int = 30, negative_prompt: str = "", size: int | None = None,
                num_images: int = 1) -> runs.Prepared:
        """Check a run's input within `self.limits` (raises UserError) without loading
        anything; numbers may come as a client sent them (int, float or text)."""
        if not isinstance(sampler, str):
            raise UserError(f"sampler: {type(sampler).__name__} given, a sampler name expected")
        if not isinstance(params, dict):
            raise UserError(f"parameters: {type(params).__name__} given, a JSON object expected")
        req = runs.Request(prompt=prompt, sampler=sampler, params=dict(params), model=self.model,
                           concept=concept.weights, concept_phrase=concept.phrase, superclass=concept.superclass,
                           negative_prompt=negative_prompt or "", steps=steps, seed=seed,
                           num_images=num_images, height=size, width=size, device=self.device,
                           dtype=self.dtype, scheduler=self.scheduler, runtime=self.runtime)
        return runs.check(req, self.limits)

    def stream(self, prep: runs.Prepared, stop: threading.Event | None = None) -> Iterator[StepUpdate | Finished]:
        """Run in a worker thread and yield a StepUpdate after every step, then Finished.

        Closing the iterator (a UI's Stop) stops the run at the next step and waits for the
        worker, so the device is free when this returns."""
        stop = stop or threading.Event()
        updates: queue.Queue = queue.Queue()
        steps = prep.config.steps

        def shown(image):  # latent-sized pictures, blown up so that a page shows them
            return image.resize((image.width * PREVIEW_ZOOM, image.height * PREVIEW_ZOOM), Image.NEAREST)

        def on_step(info):
            attention = mask = None
            if info["attention"] is not None:
                attention = [shown(map_to_image(a)) for a in info["attention"]]
                mask = [shown(map_to_image(m[0])) for m in info["mask"]]
            previews = [shown(p) for p in latents_to_rgb(info["latents"])]
            updates.put(StepUpdate(info["step"], steps, previews, attention, mask))

        def work():
            try:
                result, card = runs.execute(prep, callback=on_step, stop=stop)
                updates.put(Finished(result.images, card))
            except BaseException as e:  # handed to the consumer, which re-raises it
                updates.put(e)

        worker = threading.Thread(target=work, name="personalize-run", daemon=True)
        worker.start()
        try:
            while True:
                item = updates.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            stop.set()
            worker.join()

    def chart(self, history: list[dict], background: list[dict] = ()):
        """The session's runs on the IS/TS plane (plotly), over a sweep's curves if given."""

        rows = list(background) + session_rows(history)
        if not rows:
            fig = go.Figure()
            fig.update_layout(title="IS / TS: each run of this session lands here", xaxis_title="TS",
                              yaxis_title="IS", template="plotly_white")
            return fig
        return figure(rows, title="IS / TS of this session's runs")

    def read_results(self, path: str) -> list[dict]:
        """An uploaded sweep results.csv for the chart: at most MAX_RESULTS_MB and
        MAX_RESULTS_ROWS rows, only the columns the chart reads, every row checked (a bad
        file is a UserError, never a half-drawn chart)."""
        return read_results_upload(path)

    def generate(self, prep: runs.Prepared) -> Finished:
        for item in self.stream(prep):
            if isinstance(item, Finished):
                return item
        raise RuntimeError("the run ended without a result")

    def score(self, concept: Concept, images: list, card: dict) -> dict:
        """A copy of the run's card with its mean IS (None without reference images), TS and
        TS-class, and `metrics_random` where the metric model has random weights."""

        models = load_metric_models(self.metrics)
        template = card["prompt_template"]
        generated = models.clip_images(images)
        references = [Image.open(p) for p in concept.references]
        texts = models.clip_texts([remove_concept(template), fill(template, concept.superclass)])
        ref_clip = models.clip_images(references) if references else generated[:0]
        scores = image_scores(generated, ref_clip, texts[0], texts[1])

        def mean(values):
            return sum(values) / len(values) if values else None
        return {**card, "is": mean(scores["is"]) if references else None, "ts": mean(scores["ts"]),
                "ts_class": mean(scores["ts_class"]), "metrics": models.describe(),
                "metrics_random": models.random_weights}


def default_size(model: str) -> int:
    """The image size a model was made for (`sample_size * vae_scale_factor`, read without
    loading it); 512 (the study's SD 2 base) for hub ids."""
    return model_size(model) or 512


def check_upload(path: str, *, suffixes: tuple[str, ...], max_mb: int = MAX_UPLOAD_MB) -> Path:
    """An uploaded file the app may read: the right kind and not too large."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise UserError(f"{p.name}: only {', '.join(suffixes)} files can be uploaded")
    size_mb = p.stat().st_size / 2 ** 20
    if size_mb > max_mb:
        raise UserError(f"{p.name}: {size_mb:.0f} MB is over the upload limit of {max_mb} MB")
    return p


def read_results_upload(path: str, *, max_mb: int = MAX_RESULTS_MB, max_rows: int = MAX_RESULTS_ROWS) -> list[dict]:
    p = Path(path)
    name = p.name
    if not p.is_file():
        raise UserError(f"{name}: not a file")
    size = p.stat().st_size
    if size > max_mb * 2 ** 20:
        raise UserError(f"{name}: {size / 2 ** 20:.0f} MB is over the limit of {max_mb} MB for a results table")
    rows = []
    try:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in KEY + ("is", "ts") if c not in (reader.fieldnames or ())]
            if missing:
                raise UserError(f"{name}: not a sweep's results table (no column {missing[0]!r})")
            for k, row in enumerate(reader):
                if k >= max_rows:
                    raise UserError(f"{name}: more than {max_rows} rows; give the chart a smaller table")
                row = {c: row.get(c) or "" for c in RESULTS_COLUMNS}
                try:
                    params = json.loads(row["params"])
                    values = [float(row["is"]), float(row["ts"])]
                except (ValueError, RecursionError):
                    params, values = None, [math.nan]
                if not isinstance(params, dict) or not all(math.isfinite(v) for v in values):
                    raise UserError(f"{name}: row {k + 1} has no JSON object of parameters or no finite is and ts")
                rows.append(row)
    except UnicodeDecodeError:
        raise UserError(f"{name}: not UTF-8 text") from None
    except csv.Error as e:
        raise UserError(f"{name}: not a readable CSV table ({e})") from None
    if not rows:
        raise UserError(f"{name}: has no rows")
    return rows


def session_rows(history: list[dict]) -> list[dict]:
    """A session's scored runs as results rows for `pareto.figure`, one point per run (the
    run number is part of its parameters, so equal settings stay separate points)."""
    rows = []
    for k, card in enumerate(history):
        if card.get("is") is None or card.get("ts") is None:
            continue
        rows.append({"sampler": f"{card['sampler']} (session)", "params": json.dumps({"run": k + 1, **card["params"]}),
                     "concept": card["concept_phrase"], "prompt": card["prompt_template"], "is": card["is"],
                     "ts": card["ts"], "random_weights": str(bool(card.get("metrics_random")))})
    return rows
