"""Where a study's answers live: one SQLite file in WAL mode, one row per answer.

A connection per call (safe from any thread of the web server), a busy timeout so that
concurrent writers wait for each other instead of failing, and UNIQUE(participant,
task) with INSERT OR IGNORE: an answer sent twice for the same task by the same
participant is stored once, and the second send changes nothing.
"""

from __future__ import annotations

import csv
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from personalize.errors import UserError

ANSWERS = ("1", "2", "cant_decide")
QUESTIONS = ("ts", "is", "all")      # text prompt, original image, general impression
BUSY_MS = 30_000
DB_NAME = "answers.sqlite"
SPACES_STORAGE = Path("/data")      # Hugging Face Spaces' persistent storage, when mounted

SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    participant TEXT NOT NULL,
    task TEXT NOT NULL,
    method_1 TEXT NOT NULL,          -- what image 1 showed: the side order of this answer
    method_2 TEXT NOT NULL,
    q_ts TEXT NOT NULL CHECK (q_ts IN ('1', '2', 'cant_decide')),
    q_is TEXT NOT NULL CHECK (q_is IN ('1', '2', 'cant_decide')),
    q_all TEXT NOT NULL CHECK (q_all IN ('1', '2', 'cant_decide')),
    seconds REAL,                    -- time on the task, where the page measured it
    created TEXT NOT NULL,           -- UTC, ISO 8601
    UNIQUE (participant, task)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
COLUMNS = ("id", "participant", "task", "method_1", "method_2", "q_ts", "q_is", "q_all", "seconds", "created")


def default_db_path(study_dir: str | Path, study_id: str) -> Path:
    """PERSONALIZE_STUDY_DB when set; on a Space with persistent storage, a file under
    /data (the Space's own folder is wiped on restart); else STUDY_DIR/answers.sqlite."""
    if os.environ.get("PERSONALIZE_STUDY_DB"):
        return Path(os.environ["PERSONALIZE_STUDY_DB"])
    if os.environ.get("SPACE_ID") and SPACES_STORAGE.is_dir() and os.access(SPACES_STORAGE, os.W_OK):
        return SPACES_STORAGE / "personalize-study" / study_id / DB_NAME
    return Path(study_dir) / DB_NAME


class Store:
    """The answers of one study. `study_id` is written on first use; a file made for
    another study is refused."""

    def __init__(self, path: str | Path, study_id: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise UserError(f"study: {self.path} cannot use SQLite's WAL mode here (got {mode})")
            db.executescript(SCHEMA)
            db.execute("INSERT OR IGNORE INTO meta VALUES ('study_id', ?)", (study_id,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('secret', ?)", (secrets.token_urlsafe(24),))
            # The key that signs participant tokens and task tickets: never sent to a browser
            # (unlike 'secret', which gradio's BrowserState puts in the page).
            db.execute("INSERT OR IGNORE INTO meta VALUES ('token_key', ?)", (secrets.token_urlsafe(32),))
            stored = db.execute("SELECT value FROM meta WHERE key = 'study_id'").fetchone()[0]
        if stored != study_id:
            raise UserError(f"study: the answers file {self.path} belongs to another study ({stored}); "
                            "give this study its own file")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=BUSY_MS / 1000, isolation_level=None)  # autocommit
        try:
            db.execute(f"PRAGMA busy_timeout={BUSY_MS}")
            db.execute("PRAGMA synchronous=FULL")  # a stored answer survives a power cut
            yield db
        finally:
            db.close()

    def meta(self, key: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def add(self, participant: str, task: str, methods: tuple[str, str], answers: dict[str, str],
            seconds: float | None = None) -> tuple[int, bool]:
        """Store one answer; returns (its id, whether it is new). A second answer by the
        same participant to the same task is not stored: the first one's id comes back."""
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with self._connect() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO answers (participant, task, method_1, method_2, q_ts, q_is, q_all, "
                "seconds, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (participant, task, methods[0], methods[1], *(answers[q] for q in QUESTIONS), seconds, created))
            if cur.rowcount == 1:
                return int(cur.lastrowid), True
            row = db.execute("SELECT id FROM answers WHERE participant = ? AND task = ?",
                             (participant, task)).fetchone()
        return int(row[0]), False

    def get(self, participant: str, task: str) -> dict | None:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM answers WHERE participant = ? AND task = ?",
                             (participant, task)).fetchone()
        return dict(row) if row else None

    def answers(self) -> list[dict]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(f"SELECT {', '.join(COLUMNS)} FROM answers ORDER BY id")]

    def answered(self, participant: str) -> list[str]:
        """The tasks this participant answered, oldest first."""
        with self._connect() as db:
            return [r[0] for r in db.execute("SELECT task FROM answers WHERE participant = ? ORDER BY id",
                                              (participant,))]

    def counts(self) -> dict[str, int]:
        """How many answers each task has."""
        with self._connect() as db:
            return dict(db.execute("SELECT task, COUNT(*) FROM answers GROUP BY task").fetchall())

    def count(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def export_csv(self, path: str | Path, extra: dict[str, dict] | None = None) -> int:
        """Every answer as one CSV row; `extra` adds per-task columns (task id -> values)."""
        rows = self.answers()
        extra = extra or {}
        columns = list(COLUMNS) + list(next(iter(extra.values()), {}))
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns, lineterminator="\n")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: spreadsheet_safe(v) for k, v in {**r, **extra.get(r["task"], {})}.items()})
        return len(rows)


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A CSV cell a spreadsheet shows as text: one that begins like a formula (`=`, `+`,
    `-`, `@`, tab, carriage return) gets a leading apostrophe (OWASP's CSV injection advice)."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
