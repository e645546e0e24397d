"""Building a pairwise user study (arXiv:2502.05895) from a sweep.

- `study build SWEEP_DIR --pairs A:B,... --out STUDY_DIR` turns a sweep's images into
  tasks: for one (concept, prompt, seed, image) the two methods' images, left/right
  randomised (balanced within each pair) and recorded, one real image of the concept and
  the prompt with the class noun in place of the concept phrase. Optional attention-check
  tasks (a real image of the concept against a blank one: question 2 has one right
  answer) and repeated pairs (sides flipped) for self-consistency. Images are copied to
  `STUDY_DIR/media` under names that do not reveal the method; `tasks.json` holds the rest.
- `study demo STUDY_DIR`: the same on a tiny sweep of the offline demo model.

A method is a sampler of the sweep (`mixed`), or one of its points when the sweep has
several (`mixed[w_c=3.5,w_s=3.5]`, the sweep's `point` column).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import secrets
import shutil
import struct
import time
import uuid
import zlib
from pathlib import Path

from PIL import Image, PngImagePlugin

from personalize.errors import UserError
from personalize.evaluation.sweep import RESULTS, read_rows, run_sweep
from personalize.evaluation.sweep_config import parse_config
from personalize.images import IMAGE_SUFFIXES, image_files
from personalize.models.loading import read_concept_json
from personalize.prompts import fill
from personalize.study.layout import DEMO_PAIRS, DEMO_PROMPTS, FORMAT, MEDIA, METHOD, QUESTION_TEXT, SCHEDULE, TASKS


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


