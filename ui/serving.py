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
from pathlib import Path

from personalize.settings import whole_setting
from personalize.study.store import SPACES_STORAGE
from personalize.study.tasks import served_folders
from personalize.throttle import Throttle

QUEUE_ENV = "PERSONALIZE_QUEUE_SIZE"          # waiting events, all users together
RATE_ENV = "PERSONALIZE_RUNS_PER_MINUTE"      # generation requests per client and minute
JOINS_ENV = "PERSONALIZE_STUDY_JOINS_PER_MINUTE"   # new study participants per client and minute
KEEP_ENV = "PERSONALIZE_KEEP_RUNS_S"          # how long run folders and cached files are kept
QUEUE_SIZE, RUNS_PER_MINUTE, JOINS_PER_MINUTE, KEEP_S = 32, 20, 10, 3600
TEMP_PREFIXES = ("personalize-run-", "personalize-refs-", "personalize-study-")


def queue_settings() -> dict:
    """`demo.queue(**queue_settings())`: one run at a time, at most QUEUE_SIZE waiting
    (a client over it is told the queue is full instead of waiting)."""
    return {"default_concurrency_limit": 1, "max_size": whole_setting(QUEUE_ENV, QUEUE_SIZE)}


def blocks_settings() -> dict:
    """`gr.Blocks(**blocks_settings())`: gradio's cache cleaned of files older than KEEP_S."""
    keep = whole_setting(KEEP_ENV, KEEP_S)
    return {"delete_cache": (min(keep, 3600), keep)}


def launch_settings(lab, study_dir=None) -> dict:
    """`demo.launch(**launch_settings(lab, study_dir), ...)`: the exact files the app may
    serve (the default concept's reference images, the study's media folder, never a
    reference's whole folder) and the upload limit."""

    served = served_files(lab)
    if study_dir is not None:
        served += served_folders(study_dir)   # media/ holds only the study's images
    return {"allowed_paths": served, "max_file_size": f"{lab.max_upload_mb}mb"}


def served_files(lab) -> list[str]:
    return sorted({str(Path(p).resolve()) for p in lab.default_concept.references if Path(p).is_file()})


def clean_temp_folders(max_age_s: float | None = None, *, root: str | None = None, now: float | None = None) -> int:
    """Remove the app's temporary folders (finished runs, reference copies, study exports)
    older than `max_age_s`; returns how many went."""
    max_age_s = whole_setting(KEEP_ENV, KEEP_S) if max_age_s is None else max_age_s
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


class RateLimit(Throttle):
    """At most `per_minute` requests per client in any 60 s. The client is the address the
    server sees; behind a proxy that is the proxy's, so a Space sets FORWARDED_ALLOW_IPS
    (`trust_proxy`) and uvicorn puts the client's own address, from X-Forwarded-For, in
    its place."""

    def __init__(self, per_minute: int | None = None, *, env: str = RATE_ENV, default: int = RUNS_PER_MINUTE,
                 what: str = "runs", clients: int = 10_000, clock=time.monotonic):
        super().__init__(whole_setting(env, default) if per_minute is None else per_minute, what=what, keys=clients,
                         clock=clock)

    def check(self, request) -> None:
        """UserError when the client of this gr.Request (None: a call from Python) is over its rate."""
        client = getattr(getattr(request, "client", None), "host", None)
        if client is not None:
            self.take(client)


def trust_proxy(environ=os.environ) -> None:
    """On a Hugging Face Space every request comes through its proxy: let uvicorn read the
    client's address from X-Forwarded-For (FORWARDED_ALLOW_IPS), so that rates count per
    visitor, not for everyone at once. Elsewhere uvicorn trusts the header from loopback
    only (its default); an explicit FORWARDED_ALLOW_IPS is kept."""
    if environ.get("SPACE_ID") and not environ.get("FORWARDED_ALLOW_IPS"):
        environ["FORWARDED_ALLOW_IPS"] = "*"


def study_storage_warning(study) -> str | None:
    """A banner for every page when the study's answers would be lost on restart: on a
    Space (SPACE_ID set) with the answers file neither under persistent storage (/data)
    nor at a path set by PERSONALIZE_STUDY_DB. None when they are safe."""

    if not os.environ.get("SPACE_ID") or os.environ.get("PERSONALIZE_STUDY_DB"):
        return None
    path = Path(study.store.path).resolve()
    if path.is_relative_to(SPACES_STORAGE):
        return None
    return ("**Warning: the study's answers are not on persistent storage.** This Space has no writable "
            f"`{SPACES_STORAGE}`, so `{path}` is wiped when the Space restarts. Enable persistent storage "
            "in the Space's settings, or set PERSONALIZE_STUDY_DB to a lasting path.")
