"""A built user study served to participants: checked participants and answers, the admin
password, the per-participant task order, and `Study` (tasks out, answers in, report).
Building a study from a sweep is `study/build.py`; its report, `study/report.py`."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from personalize.errors import UserError
from personalize.settings import whole_setting
from personalize.study.layout import (
    ADMIN_ENV,
    ANSWERS_ENV,
    ANSWERS_PER_MINUTE,
    FORMAT,
    MEDIA,
    PARTICIPANT,
    QUESTION_TEXT,
    SCHEDULE,
    SECRET_ENV,
    TASKS,
)
from personalize.study.report import make_report
from personalize.study.store import ANSWERS, QUESTIONS, Store, default_db_path
from personalize.throttle import Throttle


def check_participant(participant) -> str:
    if not isinstance(participant, str) or not participant.strip():
        raise UserError("participant id: empty; give the id this participant keeps for the whole study")
    participant = participant.strip()
    if not PARTICIPANT.match(participant):
        raise UserError("participant id: at most 128 printable characters")
    return participant


def check_answers(answers) -> dict[str, str]:
    """Three answers, one per question, each "1", "2" or "cant_decide"."""
    if isinstance(answers, dict):
        answers = [answers.get(q) for q in QUESTIONS]
    answers = list(answers)
    if len(answers) != len(QUESTIONS):
        raise UserError(f"answers: give {len(QUESTIONS)} answers (text prompt, original image, general), "
                        f"got {len(answers)}")
    out = {}
    for k, (q, value) in enumerate(zip(QUESTIONS, answers), 1):
        value = value.strip() if isinstance(value, str) else value
        if value not in ANSWERS:
            raise UserError(f"answer {k} ({QUESTION_TEXT[q]}): {value!r} is not one of {', '.join(ANSWERS)}"
                            if value not in (None, "") else f"answer {k} ({QUESTION_TEXT[q]}) is missing; "
                            f"choose one of {', '.join(ANSWERS)}")
        out[q] = value
    return out


ADMIN_MIN_CHARS = 12
FAILURE_DELAY = 1.0       # seconds a wrong password waits, doubled per failure in a row
FAILURE_DELAY_MAX = 8.0
_failures = {"count": 0}
_failures_lock = threading.Lock()


def check_admin(password) -> None:
    """The report is for the study's owner: the password in PERSONALIZE_ADMIN_PASSWORD
    (at least ADMIN_MIN_CHARS characters), and nobody at all when that is not set. A wrong
    password waits FAILURE_DELAY seconds, doubled for every failure in a row (the report's
    endpoint runs one at a time, so guesses queue behind it)."""
    expected = os.environ.get(ADMIN_ENV, "")
    if not expected:
        raise UserError(f"study report: closed, no admin password is set on the server ({ADMIN_ENV})")
    if len(expected) < ADMIN_MIN_CHARS:
        raise UserError(f"study report: closed, the admin password set on the server ({ADMIN_ENV}) is shorter "
                        f"than {ADMIN_MIN_CHARS} characters")
    given = password.encode("utf-8", "surrogatepass") if isinstance(password, str) else b""
    if hmac.compare_digest(given, expected.encode("utf-8", "surrogatepass")):
        with _failures_lock:
            _failures["count"] = 0
        return
    with _failures_lock:
        _failures["count"] += 1
        delay = min(FAILURE_DELAY * 2 ** (_failures["count"] - 1), FAILURE_DELAY_MAX)
    time.sleep(delay)
    raise UserError("study report: wrong or missing admin password")


def served_folders(folder: str | Path) -> list[str]:
    """The only folder of a study a web server may serve: its images (never the tasks,
    whose method names would unblind participants, nor the answers)."""
    return [str(Path(folder).resolve() / MEDIA)]


@dataclass
class Shown:
    """What a participant sees of one task (paths are absolute)."""
    task: str
    reference: str
    prompt: str
    image_1: str
    image_2: str
    answered: int   # before this task
    total: int


class Study:
    def __init__(self, folder: str | Path, db: str | Path | None = None, *, answers_per_minute: int | None = None,
                 clock=time.monotonic):
        self.folder = Path(folder).resolve()
        path = self.folder / TASKS
        if not path.is_file():
            raise UserError(f"study: {folder} is not a study folder (no {TASKS}); make one with "
                            "`study build` or `study demo`")
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"study: {path} is not valid JSON ({e})") from None
        if data.get("format") != FORMAT:
            raise UserError(f"study: {path} is not a {FORMAT} file")
        self.data = data
        self.tasks = {t["id"]: t for t in data["tasks"]}
        self.order = list(data["tasks"])
        self.schedule = {**SCHEDULE, **data.get("schedule", {})}
        self.store = Store(db or default_db_path(self.folder, data["id"]), data["id"])
        rate = answers_per_minute or whole_setting(ANSWERS_ENV, ANSWERS_PER_MINUTE)
        self.answer_rate = Throttle(rate, what="answers from one participant", clock=clock)

    @property
    def total(self) -> int:
        return len(self.order)

    def served_folders(self) -> list[str]:
        return served_folders(self.folder)

    def browser_secret(self) -> str:
        """A stable key for the participant id kept in the browser (it must survive restarts).
        Gradio puts it in the page: it hides the id from other sites, it signs nothing."""
        return self.store.meta("secret")

    # -- participants: tokens and tickets signed by the server ---------------------------
    def _sign(self, *parts: str) -> str:
        key = (os.environ.get(SECRET_ENV) or self.store.meta("token_key")).encode()
        return hmac.new(key, "\0".join(parts).encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]

    def new_participant(self) -> str:
        """A new anonymous participant's token, `anon:<id>.<signature>` (what /study_join
        hands out); the answers are stored under `anon:<id>`."""
        participant = f"anon:{uuid.uuid4().hex}"
        return f"{participant}.{self._sign('participant', participant)}"

    def participant(self, token) -> str:
        """The participant a token names, if this study's key signed it (UserError otherwise).
        `hf:` ids are never taken from a client: `hf_participant` makes them from a login."""
        if isinstance(token, str) and token.strip().startswith("hf:"):
            raise UserError("participant id: hf: ids come only from a Hugging Face login on the study page")
        if not isinstance(token, str) or not token.strip():
            raise UserError("participant id: empty; ask /study_join for a participant token and keep it")
        participant, _, signature = token.strip().rpartition(".")
        if not (participant.startswith("anon:") and PARTICIPANT.match(participant)
                and hmac.compare_digest(signature.encode("utf-8", "surrogatepass"),
                                        self._sign("participant", participant).encode())):
            raise UserError("participant id: not a token this study handed out; ask /study_join for one")
        return participant

    def hf_participant(self, username: str) -> str:
        """The participant of a Hugging Face login (an OAuth profile the server received)."""
        return check_participant(f"hf:{username}")

    def ticket(self, participant: str, task_id: str) -> str:
        """The task id a participant is shown: `<task>.<signature>`, so that only the task
        the server assigned to that participant can be answered by them."""
        return f"{task_id}.{self._sign('task', participant, task_id)[:16]}"

    def assigned(self, participant: str, ticket) -> str:
        """The task of a ticket the server gave this participant (UserError otherwise)."""
        text = ticket.strip() if isinstance(ticket, str) else ticket
        task_id, _, signature = text.rpartition(".") if isinstance(text, str) else ("", "", "")
        self.task(task_id or ticket)  # an unknown task is named as such
        if not task_id or not hmac.compare_digest(signature.encode("utf-8", "surrogatepass"),
                                                  self.ticket(participant, task_id).rpartition(".")[2].encode()):
            raise UserError(f"task id: {ticket!r} is not a task this study gave this participant; ask /study_task "
                            "for one")
        return task_id

    # -- tasks --------------------------------------------------------------------------
    def _rank(self, participant: str) -> dict[str, int]:
        return _participant_order(participant, tuple(self.tasks))

    def next_task(self, participant: str) -> Shown | None:
        """The next task this participant has not answered (None when all are done).

        Pair tasks go least-answered first (ties in an order of the participant's own), so
        that coverage stays even; every `check_every`-th task is an attention check while
        any is left, and every `repeat_every`-th a repeated pair, at least `repeat_gap`
        answers after the original."""
        participant = check_participant(participant)
        done = self.store.answered(participant)
        seen = set(done)
        left = [t for t in self.order if t["id"] not in seen]
        if not left:
            return None
        rank = self._rank(participant)
        due, n = len(done) + 1, len(done)
        since = {task: n - 1 - i for i, task in enumerate(done)}
        checks = [t for t in left if t["kind"] == "attention"]
        gap = self.schedule["repeat_gap"]
        repeats = [t for t in left if t["kind"] == "repeat" and since.get(t["repeat_of"], -1) >= gap]
        pairs = [t for t in left if t["kind"] == "pair"]
        if checks and due % self.schedule["check_every"] == 0:
            task = min(checks, key=lambda t: rank[t["id"]])
        elif repeats and due % self.schedule["repeat_every"] == 0:
            task = min(repeats, key=lambda t: rank[t["id"]])
        elif pairs:
            counts = self.store.counts()
            task = min(pairs, key=lambda t: (counts.get(t["id"], 0), rank[t["id"]]))
        else:
            task = min(repeats or left, key=lambda t: rank[t["id"]])
        return self.show(task["id"], answered=n)

    def show(self, task_id: str, answered: int = 0) -> Shown:
        t = self.task(task_id)
        return Shown(t["id"], str(self.folder / t["reference"]), t["text"], str(self.folder / t["image_1"]),
                     str(self.folder / t["image_2"]), answered, self.total)

    def task(self, task_id) -> dict:
        key = task_id.strip() if isinstance(task_id, str) else task_id
        if key not in self.tasks:
            raise UserError(f"task id: unknown task {task_id!r} in this study; ask /study_task for one")
        return self.tasks[key]

    def progress(self, participant: str) -> int:
        return len(self.store.answered(check_participant(participant)))

    def answer(self, participant: str, task_id: str, answers, seconds: float | None = None) -> dict:
        """Store one participant's three answers to one task; everything is checked first,
        and a second answer to the same task is not stored (the first one's id comes back)."""
        participant = check_participant(participant)
        task = self.task(task_id)
        values = check_answers(answers)
        answer_id, new = self.store.add(participant, task["id"], (task["method_1"], task["method_2"]), values,
                                        seconds)
        if not new:
            kept = self.store.get(participant, task["id"])
            values = {q: kept[f"q_{q}"] for q in QUESTIONS}
        return {"answer_id": answer_id, "stored": new, "task": task["id"], "answers": values,
                "answered": self.progress(participant), "tasks": self.total,
                "message": "stored" if new else "already answered: the first answer stands"}

    # -- the web API: tokens and tickets, checked ------------------------------------------
    def task_for(self, token) -> tuple[Shown | None, str]:
        """/study_task: the next task of the participant a signed token names, and its ticket."""
        participant = self.participant(token)
        shown = self.next_task(participant)
        return shown, "" if shown is None else self.ticket(participant, shown.task)

    def answer_ticket(self, token, ticket, answers, seconds: float | None = None) -> dict:
        """/study_answer: store the answer of a signed participant to a task the server
        assigned to them (its ticket); everything is checked before anything is stored."""
        participant = self.participant(token)
        task_id = self.assigned(participant, ticket)
        return self.served_answer(participant, task_id, answers, seconds)

    def served_answer(self, participant: str, task_id: str, answers, seconds: float | None = None) -> dict:
        """`answer` for an answer that came over the web (the page or /study_answer): at
        most `answer_rate` a minute per participant, so that no one fills the study with
        answers faster than a person gives them."""
        self.answer_rate.take(check_participant(participant))
        return self.answer(participant, task_id, answers, seconds)

    # -- results ------------------------------------------------------------------------
    def report(self, *, exclude=(), max_failures: int = 0, resamples: int = 2000, seed: int = 0,
               prior: float = 0.1) -> dict:
        return make_report(self.data, self.store.answers(), exclude=exclude, max_failures=max_failures,
                           resamples=resamples, seed=seed, prior=prior)

    def admin_report(self, password, **kwargs) -> dict:
        check_admin(password)
        return self.report(**kwargs)

    def export(self, path: str | Path) -> int:
        extra = {t["id"]: {"kind": t["kind"], "concept": t["concept"], "prompt": t["prompt"], "seed": t["seed"],
                           "method_a": (t["pair"] or ["", ""])[0], "method_b": (t["pair"] or ["", ""])[1],
                           "repeat_of": t["repeat_of"] or ""} for t in self.order}
        return self.store.export_csv(path, extra)


@lru_cache(maxsize=512)
def _participant_order(participant: str, task_ids: tuple[str, ...]) -> dict[str, int]:
    """A fixed random order of the tasks for one participant (the same after a restart)."""
    keys = sorted(task_ids, key=lambda t: hashlib.sha1(f"{participant}\0{t}".encode()).digest())
    return {t: k for k, t in enumerate(keys)}
