"""Training from a front end (the app's Train tab), with no UI in it: check uploaded
photos and the request, then run `train_concept` in a worker thread and read its
progress as it comes, with a Stop that ends the run after the current step."""

from __future__ import annotations

import queue
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import UserError
from ..images import IMAGE_SUFFIXES
from .loop import train_concept
from .recipes import recipe

MIN_PHOTOS, MAX_PHOTOS = 3, 20
MAX_PHOTO_MB = 20
MAX_STEPS = 10_000


@dataclass(frozen=True)
class Progress:
    """After one optimizer step."""
    step: int
    steps: int
    loss: float
    steps_per_s: float
    eta_s: float


@dataclass(frozen=True)
class Trained:
    """The run is over (finished, or stopped after `summary["steps"]` steps)."""
    summary: dict
    out: Path

    @property
    def references(self) -> list[str]:
        """Absolute paths of the photos copied into the concept folder."""
        return [str(self.out / r) for r in self.summary.get("references", [])]


@dataclass(frozen=True)
class Request:
    """A checked training request: method (the recipe's name), phrase, superclass, steps
    and the photos' paths."""
    method: str
    phrase: str
    superclass: str
    steps: int
    photos: tuple[Path, ...]


def check_request(photos, phrase, superclass, method, steps, *, min_photos: int = MIN_PHOTOS,
                  max_photos: int = MAX_PHOTOS, max_mb: float = MAX_PHOTO_MB, max_steps: int = MAX_STEPS) -> Request:
    """Everything that can be checked without the model (UserError naming what is wrong).
    The phrase of textual inversion is checked against the tokenizer by `train_concept`,
    before anything is written."""

    rec = recipe(str(method or ""))
    phrase, superclass = " ".join(str(phrase or "").split()), " ".join(str(superclass or "").split())
    if not phrase:
        raise UserError("concept phrase: empty; write a rare phrase for the concept, e.g. 'sks star'")
    if not superclass:
        raise UserError("superclass: empty; write the concept's class noun, e.g. 'star'")
    if rec.method == "textual-inversion" and len(phrase.split()) != 1:
        raise UserError(f"concept phrase: {phrase!r}: textual inversion learns one new token; give a single word "
                        "such as <sks>")
    if isinstance(steps, bool):
        raise UserError(f"steps: {steps!r} is not a whole number")
    try:
        steps_int = int(steps)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"steps: {steps!r} is not a whole number") from None
    if steps_int != steps or not 1 <= steps_int <= max_steps:
        raise UserError(f"steps: {steps!r} must be a whole number from 1 to {max_steps}")
    photos = [Path(p) for p in (photos or [])]
    if not min_photos <= len(photos) <= max_photos:
        raise UserError(f"photos: {len(photos)} given; upload {min_photos} to {max_photos} photos of the concept")
    for path in photos:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"photos: {path.name} is not an image ({', '.join(IMAGE_SUFFIXES)} accepted)")
        size_mb = path.stat().st_size / 2 ** 20
        if size_mb > max_mb:
            raise UserError(f"photos: {path.name} is {size_mb:.1f} MB; at most {max_mb:g} MB per photo")
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, ValueError):
            raise UserError(f"photos: {path.name} does not open as an image") from None
    return Request(rec.method, phrase, superclass, steps_int, tuple(photos))


def new_concept_folder(root: str | Path | None = None) -> Path:
    """A fresh, empty folder for one trained concept (in the system's temporary folder by
    default, where the app may serve its reference images)."""
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="personalize-concept-", dir=root))


def stream_training(pipe, request: Request, stop, *, root=None,
                    **options) -> Iterator[Progress | Trained]:
    """Train into a new folder (`new_concept_folder(root)`) in a worker thread; yield the
    latest Progress as steps finish (steps that finish while the consumer is busy are
    skipped over), then Trained. `stop` is a threading.Event or anything with its
    `is_set` and `set` (a live request's ticket); setting it ends the run after the current step and
    writes the concept from the weights so far; closing the iterator stops the run and
    waits for the worker. `options` go to `train_concept` (resolution, seed, ...). An
    error in the worker is raised here, and the folder is removed if nothing was written."""

    images = []
    for path in request.photos:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    updates: queue.Queue = queue.Queue()
    done = object()

    def progress(info):
        updates.put(Progress(info["step"], info["steps"], info["loss"], info["steps_per_s"], info["eta_s"]))

    def work():
        try:
            summary = train_concept(pipe, images, phrase=request.phrase, superclass=request.superclass,
                                    method=request.method, steps=request.steps, out=out, stop=stop,
                                    references=list(request.photos), progress=progress, **options)
            updates.put(Trained(summary, out))
        except BaseException as e:  # handed to the consumer, which re-raises it
            updates.put(e)
        updates.put(done)

    out = new_concept_folder(root)
    worker = threading.Thread(target=work, name="personalize-train", daemon=True)
    worker.start()
    try:
        while True:
            item = updates.get()
            while isinstance(item, Progress) and not updates.empty():
                item = updates.get()   # only the latest step is worth showing
            if isinstance(item, BaseException):
                worker.join()
                if not any(out.iterdir()):
                    out.rmdir()
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        worker.join()
