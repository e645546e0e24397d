"""What serving the app to the public needs besides the pages: a bounded queue, a rate per
client, files served one by one, old run folders and gradio's cache cleaned, and a
warning when the study's answers would not survive a restart.

`app.py` calls these; each reads its setting from the environment (README, "Serving
publicly")."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from personalize.errors import UserError

QUEUE_ENV = "PERSONALIZE_QUEUE_SIZE"          # waiting events, all users together
RATE_ENV = "PERSONALIZE_RUNS_PER_MINUTE"      # generation requests per client and minute
KEEP_ENV = "PERSONALIZE_KEEP_RUNS_S"          # how long run folders and cached files are kept
QUEUE_SIZE, RUNS_PER_MINUTE, KEEP_S = 32, 20, 3600
TEMP_PREFIXES = ("personalize-run-", "personalize-refs-", "personalize-study-")


def setting(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UserError(f"{name}: {text!r} is not a whole number") from None
    if value < 1:
        raise UserError(f"{name}: {text!r} must be at least 1")
    return value


def queue_settings() -> dict:
    """`demo.queue(**queue_settings())`: one run at a time, at most QUEUE_SIZE waiting
    (a client over it is told the queue is full instead of waiting)."""
    return {"default_concurrency_limit": 1, "max_size": setting(QUEUE_ENV, QUEUE_SIZE)}


def launch_settings(lab, study_dir=None) -> dict:
    """`demo.launch(**launch_settings(lab, study_dir), ...)`: the exact files the app may
    serve (the default concept's reference images, the study's media folder, never a
    reference's whole folder), gradio's cache cleaned of files older than KEEP_S, and the
    upload limit."""
    from personalize.study.tasks import served_folders

    keep = setting(KEEP_ENV, KEEP_S)
    served = served_files(lab)
    if study_dir is not None:
        served += served_folders(study_dir)   # media/ holds only the study's images
    return {"allowed_paths": served, "delete_cache": (min(keep, 3600), keep),
            "max_file_size": f"{lab.max_upload_mb}mb"}


def served_files(lab) -> list[str]:
    return sorted({str(Path(p).resolve()) for p in lab.default_concept.references if Path(p).is_file()})


def clean_temp_folders(max_age_s: float | None = None, *, root: str | None = None, now: float | None = None) -> int:
    """Remove the app's temporary folders (finished runs, reference copies, study exports)
    older than `max_age_s`; returns how many went."""
    max_age_s = setting(KEEP_ENV, KEEP_S) if max_age_s is None else max_age_s
    now = time.time() if now is None else now
    removed = 0
    for folder in Path(root or tempfile.gettempdir()).iterdir():
        if not folder.name.startswith(TEMP_PREFIXES) or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            if now - folder.stat().st_mtime > max_age_s:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    return removed


def start_cleaner(every_s: float = 600) -> threading.Thread:
    """A daemon thread that runs `clean_temp_folders` every `every_s` seconds."""
    def loop():
        while True:
            clean_temp_folders()
            time.sleep(every_s)
    thread = threading.Thread(target=loop, name="personalize-cleaner", daemon=True)
    thread.start()
    return thread


class RateLimit:
    """At most `per_minute` requests per client (its address) in any 60 s; a bounded
    table, so that many addresses cannot fill the memory."""

    def __init__(self, per_minute: int | None = None, *, clients: int = 10_000, clock=time.monotonic):
        self.per_minute = setting(RATE_ENV, RUNS_PER_MINUTE) if per_minute is None else per_minute
        self.clients, self.clock = clients, clock
        self.seen: OrderedDict[str, list[float]] = OrderedDict()
        self.lock = threading.Lock()

    def check(self, request) -> None:
        """UserError when the client of this gr.Request (None: a call from Python) is over its rate."""
        client = getattr(getattr(request, "client", None), "host", None)
        if client is None:
            return
        now = self.clock()
        with self.lock:
            times = [t for t in self.seen.pop(client, []) if now - t < 60]
            if len(times) >= self.per_minute:
                self.seen[client] = times
                raise UserError(f"too many runs: at most {self.per_minute} a minute from one client; "
                                f"try again in {60 - (now - times[0]):.0f} s")
            times.append(now)
            self.seen[client] = times
            while len(self.seen) > self.clients:
                self.seen.popitem(last=False)


def study_storage_warning(study) -> str | None:
    """A banner for every page when the study's answers would be lost on restart: on a
    Space (SPACE_ID set) with the answers file neither under persistent storage (/data)
    nor at a path set by PERSONALIZE_STUDY_DB. None when they are safe."""
    from personalize.study.store import SPACES_STORAGE

    if not os.environ.get("SPACE_ID") or os.environ.get("PERSONALIZE_STUDY_DB"):
        return None
    path = Path(study.store.path).resolve()
    if path.is_relative_to(SPACES_STORAGE):
        return None
    return ("**Warning: the study's answers are not on persistent storage.** This Space has no writable "
            f"`{SPACES_STORAGE}`, so `{path}` is wiped when the Space restarts. Enable persistent storage "
            "in the Space's settings, or set PERSONALIZE_STUDY_DB to a lasting path.")
