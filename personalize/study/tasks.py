"""`study`: the pairwise user study of arXiv:2502.05895 (docs/evaluation.md, "Pairwise user study"),
on your own concepts.

- `study build SWEEP_DIR --pairs A:B,... --out STUDY_DIR` turns a sweep's images into
  tasks: for one (concept, prompt, seed, image) the two methods' images, left/right
  randomised (balanced within each pair) and recorded, one real image of the concept and
  the prompt with the class noun in place of the concept phrase. Optional attention-check
  tasks (a real image of the concept against a blank one: question 2 has one right
  answer) and repeated pairs (sides flipped) for self-consistency. Images are copied to
  `STUDY_DIR/media` under names that do not reveal the method; `tasks.json` holds the rest.
- `study demo STUDY_DIR`: the same on a tiny sweep of the offline demo model.
- `study report STUDY_DIR [--json]` and `study export STUDY_DIR --out FILE.csv`: the
  answers so far (stored by `study_store`, counted by `study_stats`).

A method is a sampler of the sweep (`mixed`), or one of its points when the sweep has
several (`mixed[w_c=3.5,w_s=3.5]`, the sweep's `point` column).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import math
import os
import random
import re
import secrets
import shutil
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from personalize.errors import UserError
from personalize.evaluation.sweep import RESULTS, read_rows, run_sweep
from personalize.evaluation.sweep_config import parse_config
from personalize.images import IMAGE_SUFFIXES, image_files
from personalize.models.loading import read_concept_json
from personalize.prompts import fill
from personalize.study import stats as st
from personalize.study.store import ANSWERS, QUESTIONS, Store, default_db_path
from personalize.throttle import Throttle

FORMAT = "personalize-study/1"
TASKS = "tasks.json"
MEDIA = "media"
ADMIN_ENV = "PERSONALIZE_ADMIN_PASSWORD"
SECRET_ENV = "PERSONALIZE_STUDY_SECRET"   # signs participant tokens; else a key kept in the answers file
ANSWERS_ENV = "PERSONALIZE_STUDY_ANSWERS_PER_MINUTE"   # answers over the web per participant and minute
ANSWERS_PER_MINUTE = 20                   # a person reads three questions and two images per answer
QUESTION_TEXT = {
    "ts": "Which image is more consistent with the text prompt?",
    "is": "Which image better represents the original image?",
    "all": "Which image is generally better in terms of alignment with the prompt and concept identity preservation?",
}
QUESTION_LABEL = {"ts": "TS", "is": "IS", "all": "All"}  # Table 1's rows
SCHEDULE = {"check_every": 6, "repeat_every": 4, "repeat_gap": 2}
DEMO_PAIRS = (("mixed", "concept"), ("mixed", "switching"))
DEMO_PROMPTS = ("a {} in the jungle", "a {} in the snow", "a {} on the beach", "a red {}")
METHOD = re.compile(r"^(?P<sampler>[a-z_]+)(?:\[(?P<point>[^\[\]]+)\])?$")
PARTICIPANT = re.compile(r"^[^\x00-\x1f\x7f]{1,128}$")


# ---------------------------------------------------------------------------------------
# Building a study from a sweep


def _split_outside_brackets(text: str, sep: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """`mixed:concept,mixed[w_s=3.0]:photoswap` -> [(A, B), ...]; A is the method whose
    win rate the report gives."""
    if not text or not text.strip():
        raise UserError("--pairs: give method pairs like mixed:concept,mixed:photoswap")
    pairs = []
    for item in _split_outside_brackets(text, ","):
        sides = _split_outside_brackets(item, ":")
        if len(sides) != 2 or not all(sides):
            raise UserError(f"--pairs: {item!r} is not A:B (two methods, e.g. mixed:concept)")
        for side in sides:
            if not METHOD.match(side):
                raise UserError(f"--pairs: {side!r} is not a method; write a sampler name, or sampler[point] "
                                "with the point as in the sweep's `point` column")
        if sides[0] == sides[1]:
            raise UserError(f"--pairs: {item!r} compares a method with itself")
        pair = (sides[0], sides[1])
        if pair in pairs or pair[::-1] in pairs:
            raise UserError(f"--pairs: {item!r} is given twice")
        pairs.append(pair)
    return pairs


def _method_rows(rows: list[dict], method: str, sweep: Path) -> tuple[dict, dict]:
    """The rows of one method by (concept, prompt, seed, image), and its description."""
    m = METHOD.match(method)
    sampler, point = m["sampler"], m["point"]
    mine = [r for r in rows if r["sampler"] == sampler]
    if not mine:
        have = sorted({r["sampler"] for r in rows})
        raise UserError(f"--pairs: the sweep {sweep} has no images of {sampler!r}; it has {', '.join(have)}")
    points = sorted({r["point"] for r in mine})
    if point is None:
        if len(points) > 1:
            raise UserError(f"--pairs: the sweep has {len(points)} points of {sampler!r}; name one: "
                            + ", ".join(f"{sampler}[{p}]" for p in points))
        point = points[0]
    elif point not in points:
        raise UserError(f"--pairs: {sampler!r} has no point {point!r} in the sweep; it has {', '.join(points)}")
    by_key = {}
    for r in mine:
        if r["point"] == point:
            by_key.setdefault((r["concept"], r["prompt"], int(r["seed"]), int(r["image"])), r)
    first = next(iter(by_key.values()))
    return by_key, {"sampler": sampler, "point": point, "params": json.loads(first["params"])}


def _references(sweep: Path, rows: list[dict], concepts: list[str], given: dict[str, str]) -> dict[str, list[Path]]:
    """Real images of each concept: `--references NAME=PATH`, else those of the concept's
    model folder (`concept.json`, as the demo model has) that the sweep recorded."""

    lock = json.loads((sweep / "sweep.json").read_text()) if (sweep / "sweep.json").is_file() else {}
    out = {}
    for c in concepts:
        if c in given:
            path = Path(given[c]).expanduser()
            files = image_files(path) if path.is_dir() \
                else [path] if path.is_file() else []
            if not files:
                raise UserError(f"--references {c}={given[c]}: no images there ({', '.join(IMAGE_SUFFIXES)})")
            out[c] = files
            continue
        info = lock.get("concepts", {}).get(c, {})
        model = info.get("model") or lock.get("model") or next(r["model"] for r in rows if r["concept"] == c)
        meta = read_concept_json(model) if model and Path(model).is_dir() else None
        files = [Path(p) for p in (meta or {}).get("references", [])]
        names = set(info.get("references", []))
        files = [p for p in files if p.is_file() and (not names or p.name in names)]
        if not files:
            raise UserError(f"study: no real images of concept {c!r} found with the sweep; "
                            f"give them with --references {c}=FOLDER")
        out[c] = files
    return out


def _check_out(out: Path, allow: tuple[str, ...] = ()) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a folder")
    if (out / TASKS).exists():
        raise UserError(f"--out: {out} is already a study; choose a new folder (its answers belong to its tasks)")
    if out.is_dir() and any(p.name not in allow for p in out.iterdir()):
        raise UserError(f"--out: {out} is not empty; choose a new folder")


class _Media:
    """Copies images into STUDY_DIR/media under opaque names (the file name a participant's
    browser sees must not say which method made the image).

    `add` copies a file once (references); `fresh` makes a new copy for every task
    occurrence, under a random name and with a random comment in the file, so that neither
    its name nor its bytes (gradio serves files under a hash of their content) let a bot
    follow one method's image from task to task; `blank` makes a new grey image per check."""

    def __init__(self, folder: Path, salt: str):
        self.folder, self.salt, self.done = folder, salt, {}
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, src: Path) -> str:
        src = src.resolve()
        if src not in self.done:
            name = hashlib.sha1(f"{self.salt}:{src}".encode()).hexdigest()[:20] + src.suffix.lower()
            shutil.copyfile(src, self.folder / name)
            self.done[src] = f"{MEDIA}/{name}"
        return self.done[src]

    def fresh(self, src: Path) -> str:
        nonce = secrets.token_hex(10)
        data, suffix = with_comment(Path(src).read_bytes(), Path(src).suffix.lower(), nonce)
        (self.folder / (nonce + suffix)).write_bytes(data)
        return f"{MEDIA}/{nonce}{suffix}"

    def blank(self, size: tuple[int, int]) -> str:
        shade = 120 + secrets.randbelow(17)  # a grey of its own for each check
        buffer = io.BytesIO()
        Image.new("RGB", size, (shade, shade, shade)).save(buffer, format="PNG")
        nonce = secrets.token_hex(10)
        data, _ = with_comment(buffer.getvalue(), ".png", nonce)
        (self.folder / f"{nonce}.png").write_bytes(data)
        return f"{MEDIA}/{nonce}.png"


def with_comment(data: bytes, suffix: str, comment: str) -> tuple[bytes, str]:
    """The image file `data` with `comment` stored in it and the pixels untouched: a PNG
    tEXt chunk after the header, a JPEG comment segment after the start marker; other
    formats are re-encoded as PNG. Returns (bytes, suffix)."""

    if data[:8] == b"\x89PNG\r\n\x1a\n":
        body = b"Comment\x00" + comment.encode("ascii")
        chunk = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", zlib.crc32(b"tEXt" + body))
        return data[:33] + chunk + data[33:], ".png"   # 8 signature + 25 IHDR bytes
    if data[:2] == b"\xff\xd8":
        body = comment.encode("ascii")
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + data[2:], suffix


    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", comment)
    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.save(out, format="PNG", pnginfo=info)
    return out.getvalue(), ".png"


def _balanced_flips(n: int, rng: random.Random) -> list[bool]:
    """n left/right choices, half each way (one more when n is odd), in random order."""
    flips = [k % 2 == 1 for k in range(n)]
    if n % 2 and rng.random() < 0.5:
        flips = [not f for f in flips]
    rng.shuffle(flips)
    return flips


def build_study(sweep: str | Path, pairs: list[tuple[str, str]], out: str | Path, *, attention_checks: int = 0,
                repeats: int = 0, per_pair: int | None = None, seed: int = 0,
                references: dict[str, str] | None = None, allow: tuple[str, ...] = ()) -> dict:
    """Write STUDY_DIR (tasks.json and media/) from a sweep folder; returns tasks.json's content."""

    sweep, out = Path(sweep), Path(out)
    if not (sweep / RESULTS).is_file():
        raise UserError(f"study build: {sweep} is not a sweep folder (no {RESULTS}); run `sweep` first")
    for name, value in (("--attention-checks", attention_checks), ("--repeats", repeats)):
        if value < 0:
            raise UserError(f"{name}: {value} must be >= 0")
    if per_pair is not None and per_pair < 1:
        raise UserError(f"--per-pair: {per_pair} must be >= 1")
    _check_out(out, allow)
    rows = read_rows(sweep / RESULTS)
    if not rows:
        raise UserError(f"study build: {sweep / RESULTS} has no rows yet")

    # 1. the methods and the (concept, prompt, seed, image) keys each pair shares
    methods, by_method = {}, {}
    for method in dict.fromkeys(m for p in pairs for m in p):
        by_method[method], methods[method] = _method_rows(rows, method, sweep)
    rng = random.Random(seed)
    shared = {}
    for a, b in pairs:
        keys = sorted(set(by_method[a]) & set(by_method[b]))
        if not keys:
            raise UserError(f"--pairs: {a} and {b} have no (concept, prompt, seed) image in common in {sweep}")
        if per_pair is not None and len(keys) > per_pair:
            keys = sorted(rng.sample(keys, per_pair))
        shared[(a, b)] = keys
    concepts = sorted({k[0] for keys in shared.values() for k in keys})
    refs = _references(sweep, rows, concepts, references or {})

    # 2. the tasks: pairs (sides balanced per pair), repeats (sides flipped), attention checks
    study_id = uuid.uuid4().hex
    out.mkdir(parents=True, exist_ok=True)
    media = _Media(out / MEDIA, study_id)
    tasks = []
    for (a, b), keys in shared.items():
        for key, flip in zip(keys, _balanced_flips(len(keys), rng)):
            concept, prompt, seed_, image = key
            row_a, row_b = by_method[a][key], by_method[b][key]
            first, second = (b, a) if flip else (a, b)
            rows_ = {a: row_a, b: row_b}
            tasks.append({
                "kind": "pair", "concept": concept, "prompt": prompt, "text": _shown_prompt(row_a),
                "seed": seed_, "image": image, "pair": [a, b], "method_1": first, "method_2": second,
                "reference": media.add(rng.choice(refs[concept])),
                "image_1": media.fresh(sweep / rows_[first]["image_path"]),
                "image_2": media.fresh(sweep / rows_[second]["image_path"]),
            })
    pair_tasks = list(tasks)
    for original in rng.sample(pair_tasks, min(repeats, len(pair_tasks))):
        tasks.append(dict(original, kind="repeat", method_1=original["method_2"], method_2=original["method_1"],
                          image_1=media.fresh(out / original["image_2"]),
                          image_2=media.fresh(out / original["image_1"]), _original=original))
    if attention_checks:
        from PIL import Image

        with Image.open(sweep / rows[0]["image_path"]) as im:
            size = im.size
        for real_first in _balanced_flips(attention_checks, rng)[::-1]:
            base = rng.choice(pair_tasks)
            pool = refs[base["concept"]]
            original, real = rng.sample(pool, 2) if len(pool) > 1 else (pool[0], pool[0])
            real, side, blank = media.fresh(real), "1" if real_first else "2", media.blank(size)
            tasks.append({
                "kind": "attention", "concept": base["concept"], "prompt": base["prompt"], "text": base["text"],
                "seed": base["seed"], "image": base["image"], "pair": None,
                "method_1": "real" if real_first else "blank", "method_2": "blank" if real_first else "real",
                "reference": media.add(original), "image_1": real if real_first else blank,
                "image_2": blank if real_first else real, "expected": {"is": side},
            })
    rng.shuffle(tasks)  # task ids say nothing about the pair
    for k, t in enumerate(tasks):
        t["id"] = f"t{k + 1:05d}"
    for t in tasks:
        t["repeat_of"] = t.pop("_original")["id"] if "_original" in t else None
        t.setdefault("expected", None)

    data = {
        "format": FORMAT, "id": study_id, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sweep": str(sweep.resolve()), "seed": seed, "questions": QUESTION_TEXT,
        "methods": methods, "pairs": [list(p) for p in pairs], "schedule": dict(SCHEDULE),
        "random_weights": _is_demo(rows), "tasks": tasks,
    }
    tmp = out / f".{TASKS}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(out / TASKS)
    return data


def _shown_prompt(row: dict) -> str:
    """The prompt a participant reads: the class noun in place of the concept phrase."""
    if row.get("ts_class_prompt"):
        return row["ts_class_prompt"]

    return fill(row["prompt"], row.get("superclass") or "object")


def _is_demo(rows: list[dict]) -> bool:
    """Whether the images come from the offline demo model (random weights)."""

    model = rows[0].get("model", "")
    try:
        meta = read_concept_json(model) if model and Path(model).is_dir() else None
    except UserError:
        return False
    return bool(meta and meta.get("random_weights"))


def make_demo(out: str | Path, *, model: str | None = None, steps: int = 3, size: int = 64) -> dict:
    """A small ready study on the offline demo model: a sweep of three samplers over four
    prompts and two seeds (in STUDY_DIR/sweep), then 16 pair tasks, 2 repeats, 2 checks."""

    out = Path(out)
    _check_out(out, allow=("sweep",))
    if model is None:
        from personalize.models.loading import default_model
        model, _reason = default_model()
    config = parse_config({
        "model": str(Path(model).resolve()), "concepts": [{"name": "demo"}], "prompts": list(DEMO_PROMPTS),
        "seeds": [0, 1], "steps": steps, "height": size, "width": size, "metrics": {"dino": "none"},
        "samplers": [{"name": "concept", "points": [{"w": 7.0}]}, {"name": "mixed", "points": [{}]},
                     {"name": "switching", "points": [{"t_sw": max(1, steps // 2)}]}],
    }, base=out.parent if out.parent.exists() else ".", device="cpu")
    run_sweep(config, out / "sweep", progress=False)
    return build_study(out / "sweep", list(DEMO_PAIRS), out, attention_checks=2, repeats=2, seed=0,
                       allow=("sweep",))


# ---------------------------------------------------------------------------------------
# A built study: tasks to participants, answers in, the report out


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
        rate = answers_per_minute or _whole_setting(ANSWERS_ENV, ANSWERS_PER_MINUTE)
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


def _finite(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


def make_report(study: dict, answers: list[dict], *, exclude=(), max_failures: int = 0, resamples: int = 2000,
                seed: int = 0, prior: float = 0.1) -> dict:
    """Every number of the report, from tasks.json's content and the stored answers."""

    tasks = {t["id"]: t for t in study["tasks"]}
    answers = [a for a in answers if a["task"] in tasks]
    everyone = sorted({a["participant"] for a in answers})

    # 1. quality control: attention checks, and anyone excluded by hand
    checks = {}
    for a in answers:
        t = tasks[a["task"]]
        if t["kind"] == "attention":
            c = checks.setdefault(a["participant"], [0, 0])
            c[0] += 1
            c[1] += any(a[f"q_{q}"] != side for q, side in (t["expected"] or {}).items())
    excluded = {}
    for p, (n, failed) in checks.items():
        if failed > max_failures:
            excluded[p] = f"failed {failed} of {n} attention check(s)"
    for p in exclude:
        excluded.setdefault(p, "excluded by hand")
    kept = [a for a in answers if a["participant"] not in excluded]

    def outcome(a, q):
        """The method whose image was chosen, None for "Can't decide"."""
        v = a[f"q_{q}"]
        return None if v == "cant_decide" else a["method_1"] if v == "1" else a["method_2"]

    # 2. per pair and question: shares, win rate, Wilson on the decisive answers, bootstrap
    pairs = [tuple(p) for p in study["pairs"]]
    rows = []
    for k, (a_, b_) in enumerate(pairs):
        mine = [a for a in kept if tasks[a["task"]]["kind"] == "pair" and tuple(tasks[a["task"]]["pair"]) == (a_, b_)]
        people = sorted({a["participant"] for a in mine})
        index = {p: i for i, p in enumerate(people)}
        for j, q in enumerate(QUESTIONS):
            counts = np.zeros((len(people), 3))
            for a in mine:
                chosen = outcome(a, q)
                counts[index[a["participant"]], 2 if chosen is None else 0 if chosen == a_ else 1] += 1
            w, l, t = counts.sum(axis=0) if len(people) else (0.0, 0.0, 0.0)
            n = w + l + t
            rows.append({
                "a": a_, "b": b_, "question": q, "answers": int(n), "participants": len(people),
                "wins": int(w), "losses": int(l), "ties": int(t),
                "win_share": _finite(w / n if n else math.nan), "loss_share": _finite(l / n if n else math.nan),
                "tie_share": _finite(t / n if n else math.nan), "win_rate": _finite(st.win_rate(w, l, t)),
                "decisive_win_rate": _finite(w / (w + l) if w + l else math.nan),
                "wilson_95": [_finite(x) for x in st.wilson(w, w + l)],
                "bootstrap_95": [_finite(x) for x in st.cluster_bootstrap(
                    counts, resamples=resamples, seed=np.random.default_rng([seed, k, j]))],
            })

    # 3. Bradley-Terry over all methods, per question (ties: half a win each)
    names = list(study["methods"])
    pos = {m: i for i, m in enumerate(names)}
    ranking = {}
    for q in QUESTIONS:
        wins = np.zeros((len(names), len(names)))
        for a in kept:
            t = tasks[a["task"]]
            if t["kind"] != "pair":
                continue
            x, y = pos[t["pair"][0]], pos[t["pair"][1]]
            chosen = outcome(a, q)
            if chosen is None:
                wins[x, y] += 0.5
                wins[y, x] += 0.5
            else:
                winner, loser = (x, y) if chosen == t["pair"][0] else (y, x)
                wins[winner, loser] += 1
        strength = st.bradley_terry(wins, prior=prior)
        order = sorted((i for i in range(len(names)) if not math.isnan(strength[i])), key=lambda i: -strength[i])
        ranking[q] = {"connected": st.connected(wins > 0), "prior_wins": prior, "methods": [
            {"rank": r + 1, "method": names[i], "strength": _finite(strength[i]),
             "log_strength": _finite(math.log(strength[i]) - float(np.mean(np.log(strength[order]))))}
            for r, i in enumerate(order)]}

    # 4. position bias (image 1 vs image 2) over all compared pairs, repeats included
    compared = [a for a in kept if tasks[a["task"]]["kind"] in ("pair", "repeat")]
    bias = {}
    for q in QUESTIONS:
        ones = sum(a[f"q_{q}"] == "1" for a in compared)
        twos = sum(a[f"q_{q}"] == "2" for a in compared)
        bias[q] = {"image_1": ones, "image_2": twos, "cant_decide": len(compared) - ones - twos,
                   "share_image_1": _finite(ones / (ones + twos) if ones + twos else math.nan),
                   "wilson_95": [_finite(x) for x in st.wilson(ones, ones + twos)],
                   "p_value": _finite(st.binomial_p_value(ones, ones + twos))}

    # 5. self-consistency: a repeated pair answered by the one who answered the original
    by_key = {(a["participant"], a["task"]): a for a in kept}
    consistency = {}
    for q in QUESTIONS:
        first, second = [], []
        for a in kept:
            t = tasks[a["task"]]
            if t["kind"] == "repeat" and (a["participant"], t["repeat_of"]) in by_key:
                first.append(outcome(by_key[(a["participant"], t["repeat_of"])], q))
                second.append(outcome(a, q))
        same, n = st.agreement(first, second)
        consistency[q] = {"repeats": n, "same": same, "share": _finite(same / n if n else math.nan)}

    return {
        "answers": len(answers), "participants": len(everyone),
        "included": {"answers": len(kept), "participants": len({a["participant"] for a in kept})},
        "excluded": [{"participant": p, "reason": r} for p, r in sorted(excluded.items())],
        "attention_checks": {p: {"answered": n, "failed": f} for p, (n, f) in sorted(checks.items())},
        "questions": dict(QUESTION_TEXT), "pairs": rows, "bradley_terry": ranking,
        "position_bias": bias, "self_consistency": consistency,
        "settings": {"max_failures": max_failures, "bootstrap_resamples": resamples, "seed": seed},
        "random_weights": bool(study.get("random_weights")),
    }


def _interval(pair) -> str:
    lo, hi = pair
    return "   n/a      " if lo is None else f"[{lo:.2f}, {hi:.2f}]"


def _num(x, fmt=".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def format_report(r: dict) -> str:
    """The report as text: per pair and question, Table 1, rankings, quality control."""
    lines = [(f"{r['answers']} answers from {r['participants']} participant(s); counted: "
              f"{r['included']['answers']} from {r['included']['participants']}")]
    for e in r["excluded"]:
        lines.append(f"  excluded {e['participant']}: {e['reason']}")
    if r.get("random_weights"):
        lines.append("  (images from the offline demo model: random weights)")
    lines.append("")
    lines.append(f"{'A vs B':<34} {'q':<4} {'n':>5} {'win':>5} {'loss':>5} {'tie':>5} {'win rate':>8}  "
                 f"{'Wilson 95% (decisive)':<22} bootstrap 95% (by participant)")
    for p in r["pairs"]:
        lines.append(f"{p['a'] + ' vs ' + p['b']:<34} {QUESTION_LABEL[p['question']]:<4} {p['answers']:>5} "
                     f"{_num(p['win_share']):>5} {_num(p['loss_share']):>5} {_num(p['tie_share']):>5} "
                     f"{_num(p['win_rate']):>8}  {_num(p['decisive_win_rate'])} {_interval(p['wilson_95']):<17} "
                     f"{_interval(p['bootstrap_95'])}")
    # Table 1: one column per pair, one row per question
    heads = [f"{p['a']} vs {p['b']}" for p in r["pairs"] if p["question"] == QUESTIONS[0]]
    width = max([12] + [len(h) for h in heads])
    lines += ["", "Table 1: win rate of A (ties as half)", " " * 5 + "".join(f"{h:>{width + 2}}" for h in heads)]
    for q in QUESTIONS:
        cells = [_num(p["win_rate"]) for p in r["pairs"] if p["question"] == q]
        lines.append(f"{QUESTION_LABEL[q]:<5}" + "".join(f"{c:>{width + 2}}" for c in cells))
    lines += ["", "Bradley-Terry ranking (strengths sum to 1)"]
    for q in QUESTIONS:
        bt = r["bradley_terry"][q]
        text = "  ".join(f"{m['rank']}. {m['method']} {_num(m['strength'], '.3f')}" for m in bt["methods"])
        lines.append(f"  {QUESTION_LABEL[q]:<4} {text or 'no answers'}" +
                     ("" if bt["connected"] else "  (comparison graph not connected: scales not comparable)"))
    lines += ["", "Position bias: share choosing image 1 among decisive answers (0.50 = none)"]
    for q in QUESTIONS:
        b = r["position_bias"][q]
        lines.append(f"  {QUESTION_LABEL[q]:<4} {_num(b['share_image_1'])} {_interval(b['wilson_95'])} "
                     f"p = {_num(b['p_value'], '.3g')}  ({b['image_1']} vs {b['image_2']})")
    lines += ["", "Self-consistency on repeated pairs (same choice twice)"]
    for q in QUESTIONS:
        c = r["self_consistency"][q]
        lines.append(f"  {QUESTION_LABEL[q]:<4} {_num(c['share'])} ({c['same']} of {c['repeats']})")
    return "\n".join(lines)


def _whole_setting(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"{name}: {text!r} is not a whole number of at least 1")
    return int(text)
