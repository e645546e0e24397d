"""`personalize reproduce [--world DIR] --out DIR [--quick]`: the study's sweeps on the
world (docs/world.md), then a report of every study figure, with the truth known.

The sweeps run through the sweep machinery (`sweep.py`: resumable, batched); the report
is a pure function of the sweep's `results.csv` (and, for its wall-time line, of
`runs.json`, the runs that finished), so a killed run, run again, finishes the batch it
lost and writes the same report apart from that line. Files:

- `report.html`: offline Plotly, one chart per study figure (mixed per w_s, switching
  and multi-stage against mixed, masked per quantile, ProFusion per fusion strength,
  Photoswap's three settings, all samplers), plus the judge's fidelity charts;
- `report.md`: per sampler point IS, TS, judge concept and context fidelity with 95%
  intervals, rows and seconds per image; the study's qualitative claims with a verdict
  measured on the data; how well IS and TS track the judge (Spearman over points);
- `charts/*.png`: the same charts drawn with matplotlib (when it is installed).
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml
from scipy.stats import spearmanr

from personalize.errors import UserError
from personalize.evaluation.pareto import AXES, curves, figure, pareto_front, summarize
from personalize.evaluation.prompt_sets import WORLD
from personalize.evaluation.sweep import RESULTS, process_state, read_rows, run_sweep
from personalize.evaluation.sweep_config import parse_config
from personalize.prompts import prompt_pair
from personalize.sampling.batched import Item, run_many
from personalize.sampling.engine import run
from personalize.sampling.runtime import onnx_denoiser, resolve_runtime
from personalize.sampling.samplers import configure
from personalize.world.paths import is_world

STEPS = 25          # the world's DDIM steps
STUDY_STEPS = 50    # the study's grids are in steps of a 50-step run
THROUGHPUT_TARGET = 3.0  # the sweep's images per second over one `generate` per image, at least


def _steps(t: int, steps: int) -> int:
    return min(steps, int(t * steps / STUDY_STEPS + 0.5))


def study_samplers(steps: int = STEPS, quick: bool = False) -> list[dict]:
    """The study's grids (docs/samplers.md), step counts scaled to `steps`."""
    if quick:
        return [
            {"name": "concept", "points": [{"w": 7.0}]},
            {"name": "mixed", "points": [{"w_s": w, "w_c": 7.0 - w} for w in (1.0, 3.5, 6.0)]},
            {"name": "switching", "points": [{"w": 7.0, "t_sw": _steps(10, steps)}]},
            {"name": "multistage", "points": [{"w_s": 3.0, "w_c": 4.0, "t_sw": _steps(10, steps)}]},
            {"name": "masked", "points": [{"q": 0.7}]},
            {"name": "profusion", "points": [{"r": 0.5}]},
            {"name": "photoswap", "points": [{"t_sf": _steps(5, steps), "t_cm": _steps(15, steps),
                                              "t_sm": _steps(20, steps)}]},
        ]
    sw = sorted({_steps(t, steps) for t in (1, 3, 5, 7, 10, 20, 30, 40)})
    return [
        {"name": "concept", "points": [{"w": 7.0}]},
        {"name": "superclass", "points": [{"w": 7.0}]},
        {"name": "mixed", "points": [{"w_s": w, "w_c": 7.0 - w} for w in (0, 1, 2, 3, 3.5, 4, 5, 6, 7)]},
        {"name": "switching", "points": [{"w": 7.0, "t_sw": t} for t in sw]},
        {"name": "multistage", "points": [{"w_s": w, "w_c": 7.0 - w, "t_sw": _steps(10, steps)} for w in (1, 3, 5)]},
        {"name": "masked", "points": [{"q": q} for q in (0.3, 0.5, 0.7, 0.9)]},
        {"name": "profusion", "points": [{"r": r, "w_s": 3.5, "w_c": 3.5}
                                         for r in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)]},
        {"name": "photoswap", "points": [{"t_sf": _steps(a, steps), "t_cm": _steps(b, steps),
                                          "t_sm": _steps(c, steps)} for a, b, c in ((1, 10, 15), (5, 15, 20),
                                                                                    (10, 20, 25))]},
    ]


def study_config(world: Path, *, quick: bool, images: int, steps: int, batch_images: int,
                 runtime: str = "auto") -> dict:
    concepts = ["star"] if quick else ["star", "ball"]
    prompts = [WORLD[0], WORLD[9]] if quick else list(WORLD)  # quick: one context, one colour prompt
    return {"model": str(world), "concepts": [{"name": c} for c in concepts], "prompts": prompts,
            "seeds": [0], "steps": steps, "height": 64, "width": 64, "images_per_prompt": images,
            "batch_images": batch_images, "device": "cpu", "runtime": runtime,
            "samplers": study_samplers(steps, quick)}


# ---------------------------------------------------------------------------------------
# Numbers from rows (pure functions)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson 95% interval of a share k/n."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (c - h, c + h)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of its normal 95% interval."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n)


def point_table(rows: list[dict]) -> list[dict]:
    """One entry per sampler point, in the order the rows first show it."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        by[(r["sampler"], r["params"])].append(r)
    out = []
    for (sampler, params), rs in by.items():
        entry = {"sampler": sampler, "params": json.loads(params), "images": len(rs)}
        for col in ("is", "ts"):
            entry[col], entry[col + "_ci"] = mean_ci([float(r[col]) for r in rs])
        for col in ("concept_fidelity", "context_fidelity"):
            vs = [int(r[col]) for r in rs if r.get(col, "") != ""]
            entry[col] = sum(vs) / len(vs) if vs else float("nan")
            entry[col + "_ci"] = wilson(sum(vs), len(vs))
        entry["rows"] = sum(int(r["rows"]) for r in rs) / len(rs)
        entry["seconds"] = sum(float(r["seconds"]) for r in rs) / len(rs)
        out.append(entry)
    return out


def spearman(a: list[float], b: list[float]) -> float:
    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2 or any(v != v for v in list(a) + list(b)):
        return float("nan")  # undefined for a constant or incomplete series

    return float(spearmanr(a, b).statistic)


def _dominated(p, others) -> bool:
    return any(o[0] >= p[0] and o[1] >= p[1] and (o[0] > p[0] or o[1] > p[1]) for o in others)


def _nearest(p, others) -> float:
    return min(math.dist(p, o) for o in others) if others else float("nan")


UNRESOLVED = "unresolved"  # a comparison of two points whose 95% intervals overlap


def interval(point: dict, col: str) -> tuple[float, float]:
    """A point's 95% interval of `col`: mean +- half-width for IS/TS, Wilson for shares."""
    ci = point.get(col + "_ci")
    if isinstance(ci, tuple):
        return ci
    half = ci or 0.0
    return point[col] - half, point[col] + half


def findings(points: list[dict], x: str, y: str) -> list[tuple[str, str, str]]:
    """The study's qualitative claims, each with a verdict measured in the (x, y) plane:
    (claim, verdict, the number behind it). A claim about two single points is "not
    resolved" where their 95% intervals overlap."""
    of = lambda name: [p for p in points if p["sampler"] == name]  # noqa: E731
    xy = lambda ps: [(p[x], p[y]) for p in ps]  # noqa: E731
    mixed, out = of("mixed"), []

    def add(claim, ok, detail):
        verdict = {None: "not measured", UNRESOLVED: "not resolved"}.get(ok, "confirmed" if ok else "NOT confirmed")
        out.append((claim, verdict, detail))

    ws = [p["params"]["w_s"] for p in mixed]
    rx, ry = spearman(ws, [p[x] for p in mixed]), spearman(ws, [p[y] for p in mixed])
    add("mixed sampling's trade-off is monotone in w_s (x rises, y falls)",
        None if math.isnan(rx) else rx > 0.8 and ry < -0.8, f"Spearman(w_s, {x}) {rx:+.2f}, (w_s, {y}) {ry:+.2f}")
    for name, claim in (("switching", "switching lies below mixed's frontier"),):
        ps = of(name)
        share = sum(_dominated(q, xy(mixed)) for q in xy(ps)) / len(ps) if ps and mixed else None
        add(claim, None if share is None else share >= 0.5, "n/a" if share is None else
            f"{share:.0%} of {len(ps)} switching points dominated by a mixed point")
    ms, sw = of("multistage"), of("switching")
    if ms and mixed and sw:
        d_ms = sum(_nearest(q, xy(mixed)) for q in xy(ms)) / len(ms)
        d_sw = sum(_nearest(q, xy(mixed)) for q in xy(sw)) / len(sw)
        add("multi-stage lies between switching and mixed", d_ms <= d_sw,
            f"mean distance to mixed: multi-stage {d_ms:.3f}, switching {d_sw:.3f}")
    else:
        add("multi-stage lies between switching and mixed", None, "n/a")
    mk = of("masked")
    crossing = sum(not _dominated(q, xy(mixed)) for q in xy(mk)) if mk and mixed else None
    add("masked crosses mixed's frontier only at some points",
        None if crossing is None else 0 < crossing < len(mk) or (len(mk) == 1 and crossing == 1),
        "n/a" if crossing is None else f"{crossing} of {len(mk)} masked points not dominated by mixed")
    ph = of("photoswap")
    if ph and sw and mixed:
        to_sw = sum(_nearest(q, xy(sw)) for q in xy(ph)) / len(ph)
        to_mx = sum(_nearest(q, xy(mixed)) for q in xy(ph)) / len(ph)
        add("Photoswap is close to switching", to_sw <= to_mx,
            f"mean distance to switching {to_sw:.3f}, to mixed {to_mx:.3f}")
    else:
        add("Photoswap is close to switching", None, "n/a")
    pf = sorted(of("profusion"), key=lambda p: p["params"]["r"])
    ref = [p for p in mixed if p["params"].get("w_s") == 3.5]
    if len(pf) >= 3 and ref:
        d = [math.dist((p[x], p[y]), (ref[0][x], ref[0][y])) for p in pf]
        rho = spearman([p["params"]["r"] for p in pf], d)
        add("ProFusion approaches mixed as r falls", rho > 0, f"Spearman(r, distance to mixed w_s=3.5) {rho:+.2f}")
    else:
        add("ProFusion approaches mixed as r falls", None, f"{len(pf)} ProFusion point(s)")
    concept = of("concept")
    if pf and concept:
        top, base = pf[-1], concept[0]
        (lo, hi), (base_lo, base_hi) = interval(top, y), interval(base, y)
        if top[y] != top[y] or base[y] != base[y]:
            ok = None   # no judge on this axis
        else:
            ok = UNRESOLVED if lo <= base_hi and base_lo <= hi else top[y] > base[y]
        add("ProFusion exceeds concept sampling's fidelity at high r", ok,
            f"{y} at r={top['params']['r']:g}: {top[y]:.3f} [{lo:.3f}, {hi:.3f}]; concept sampling "
            f"{base[y]:.3f} [{base_lo:.3f}, {base_hi:.3f}]")
    else:
        add("ProFusion exceeds concept sampling's fidelity at high r", None, "n/a")
    return out


# ---------------------------------------------------------------------------------------
# Charts

FIGURES = [  # (file stem, title, samplers shown)
    ("mixed", "Mixed sampling per w_s (w_c = 7 - w_s)", ("mixed",)),
    ("switching_multistage", "Switching and multi-stage against mixed", ("mixed", "switching", "multistage")),
    ("masked", "Masked sampling, four quantiles, against mixed", ("mixed", "masked")),
    ("profusion", "ProFusion per fusion strength r", ("mixed", "concept", "profusion")),
    ("photoswap", "Photoswap's three settings against switching", ("switching", "photoswap", "mixed")),
    ("all", "All samplers", None),
]


def charts(rows: list[dict]):
    """(stem, title, x, y, rows) of every chart: each study figure in IS/TS, then the
    judge's fidelity for all samplers and for mixed."""
    out = []
    for stem, title, samplers in FIGURES:
        sub = [r for r in rows if samplers is None or r["sampler"] in samplers]
        if sub:
            out.append((stem, title, "ts", "is", sub))
    if rows and rows[0].get("concept_fidelity", "") != "":
        out.append(("judge_all", "Judge: concept vs context fidelity, all samplers", "context_fidelity",
                    "concept_fidelity", rows))
        mixed = [r for r in rows if r["sampler"] == "mixed"]
        if mixed:
            out.append(("judge_mixed", "Judge: mixed sampling per w_s", "context_fidelity", "concept_fidelity",
                        mixed))
    return out


def write_html(path: Path, chart_list) -> None:
    parts = []
    for k, (stem, title, x, y, sub) in enumerate(chart_list):
        fig = figure(sub, x=x, y=y, title=title)
        parts.append(fig.to_html(full_html=False, include_plotlyjs=k == 0))
    html = ("<!doctype html><html><head><meta charset='utf-8'><title>The study on the world</title></head>"
            "<body><h1>The study reproduced on the world</h1><p>See report.md for the tables.</p>"
            + "\n".join(parts) + "</body></html>")
    path.write_text(html, encoding="utf-8")


def write_pngs(folder: Path, chart_list) -> str | None:
    """PNG charts with matplotlib; the reason when it cannot be had."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no PNG charts (report.html has them all)"

    folder.mkdir(parents=True, exist_ok=True)
    for stem, title, x, y, sub in chart_list:
        points = summarize(sub, x, y)
        fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
        for name, members in curves(points):
            ax.plot([p.x for p in members], [p.y for p in members], "o-", label=name, markersize=4)
        front = [points[i] for i in pareto_front([(p.x, p.y) for p in points])]
        ax.plot([p.x for p in front], [p.y for p in front], "k--", lw=1, label="Pareto frontier")
        ax.set(title=title, xlabel=AXES[x], ylabel=AXES[y])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / f"{stem}.png")
        plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------
# The report


def _f(v: float, digits: int = 3) -> str:
    return "n/a" if v != v else f"{v:.{digits}f}"


def wall_time(runs: list[dict]) -> str:
    """The report's line on time: the sum over the runs that computed images."""
    worked = [r for r in runs if r["new_images"]]
    seconds, images = sum(r["seconds"] for r in worked), sum(r["new_images"] for r in worked)
    if not images:
        return "Wall time: no images computed by a run that finished."
    procs = sorted({r["processes"] for r in worked})
    runtimes = sorted({r.get("runtime", "torch") for r in worked})
    return (f"Wall time {seconds:.0f} s ({seconds / 60:.1f} min) for {images} images in {len(worked)} run(s) "
            f"of {'/'.join(map(str, procs))} process(es): {images / seconds:.2f} images/s; denoiser in "
            f"{' and '.join(RUNTIME_NAMES[r] for r in runtimes)}.")


def report_md(rows: list[dict], meta: dict, png_note: str | None, chart_list) -> str:
    points = point_table(rows)
    lines = ["# The study reproduced on the world", "",
             f"World: `{meta['world']}`; {meta['concepts']} concept(s), {meta['prompts']} prompt(s), "
             f"{meta['images_per_prompt']} image(s) per prompt, {meta['steps']} DDIM steps; "
             f"{len(points)} sampler points, {len(rows)} images.",
             wall_time(meta["runs"]) + f" Metric model: {meta['metric_models']}; no DINO.",
             "", "IS/TS from the world's metric model; fidelities from the judge, read from pixels "
             "(docs/world.md). Intervals are 95% (normal for IS/TS, Wilson for fidelities).", "",
             "## Per sampler point", "",
             "| sampler | parameters | IS | TS | concept fidelity | context fidelity | images | rows/image "
             "| s/image |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p["params"].items())
        cf, xf = p["concept_fidelity_ci"], p["context_fidelity_ci"]
        lines.append(f"| {p['sampler']} | {params} | {_f(p['is'])} ± {_f(p['is_ci'])} | {_f(p['ts'])} ± "
                     f"{_f(p['ts_ci'])} | {_f(p['concept_fidelity'], 2)} [{_f(cf[0], 2)}, {_f(cf[1], 2)}] | "
                     f"{_f(p['context_fidelity'], 2)} [{_f(xf[0], 2)}, {_f(xf[1], 2)}] | {p['images']} | "
                     f"{p['rows']:.0f} | {p['seconds']:.3f} |")
    lines += ["", "## The study's claims, measured", "",
              "| claim | metrics (TS, IS) | | judge (context, concept fidelity) | |", "|---|---|---|---|---|"]
    by_metric = findings(points, "ts", "is")
    by_judge = findings(points, "context_fidelity", "concept_fidelity")
    for (claim, v1, d1), (_, v2, d2) in zip(by_metric, by_judge):
        lines.append(f"| {claim} | {v1} | {d1} | {v2} | {d2} |")
    r_is = spearman([p["is"] for p in points], [p["concept_fidelity"] for p in points])
    r_ts = spearman([p["ts"] for p in points], [p["context_fidelity"] for p in points])
    lines += ["", "## How well the metrics track the truth", "",
              f"Spearman over the {len(points)} sampler points: IS vs concept fidelity {_f(r_is, 2)}; "
              f"TS vs context fidelity {_f(r_ts, 2)}.", "", "## Charts", ""]
    if png_note:
        lines.append(png_note)
    else:
        lines += [f"![{title}](charts/{stem}.png)" for stem, title, *_ in chart_list]
    return "\n".join(lines) + "\n"


TIMING_FILE = "runs.json"  # one entry per run of the command: the report's wall time is their sum
RUNTIME_NAMES = {"torch": "PyTorch", "onnx": "ONNX Runtime (masked sampling and Photoswap in PyTorch)"}


def record_run(out: Path, seconds: float, new_images: int, processes: int, runtime: str = "torch") -> list[dict]:
    """Append this run to `out/runs.json` (written whole, then renamed, so a kill leaves
    the old file) and return every run so far."""
    path = out / TIMING_FILE
    runs = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    runs.append({"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 1),
                 "new_images": new_images, "processes": processes, "runtime": runtime})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(runs, indent=1), encoding="utf-8")
    tmp.replace(path)
    return runs


def reproduce(world: str | Path, out: str | Path, *, quick: bool = False, images: int | None = None,
              steps: int | None = None, batch_images: int = 64, progress: bool = True,
              runtime: str = "auto") -> dict:
    """Run (or resume) the study's sweeps on `world` into `out/sweep`, then write the report.

    Under `accelerate launch --num_processes N` every process takes its share of the
    sweep (`run_sweep`); the first process alone writes the config, the timing and the
    report. A killed run's time is lost with it: the recorded wall time counts the runs
    that finished."""

    world, out = Path(world).expanduser().resolve(), Path(out)
    if not is_world(world):
        raise UserError(f"--world: {world} is not a world (no world.json); build one with `personalize world build`")
    steps = steps or (4 if quick else STEPS)
    images = images or (1 if quick else 10)
    raw = study_config(world, quick=quick, images=images, steps=steps, batch_images=batch_images, runtime=runtime)
    config = parse_config(raw, base=out)
    runtime = resolve_runtime(runtime, config.device, config.dtype)
    state = process_state(config.device)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))  # what ran, for `personalize sweep`
    started = time.perf_counter()
    summary = run_sweep(config, out / "sweep", progress=progress)
    seconds = time.perf_counter() - started
    # the merged rows are counted by the first process only; the others know their share
    new_images = summary.rows - summary.done_before if state.is_main_process else summary.images
    meta = {"world": world.name, "concepts": len(config.concepts), "prompts": len(config.concepts[0].prompts),
            "images_per_prompt": images, "steps": steps, "seconds": seconds, "new_images": new_images,
            "images_per_second": new_images / seconds if new_images else 0.0, "processes": state.num_processes}
    if not state.is_main_process:
        return meta
    runs = record_run(out, seconds, new_images, state.num_processes, runtime)
    meta["runs"] = runs
    rows = read_rows(out / "sweep" / RESULTS)
    meta["metric_models"] = rows[0]["metric_models"] if rows else ""
    chart_list = charts(rows)
    write_html(out / "report.html", chart_list)
    png_note = write_pngs(out / "charts", chart_list)
    (out / "report.md").write_text(report_md(rows, meta, png_note, chart_list), encoding="utf-8")
    return meta


# ---------------------------------------------------------------------------------------
# Throughput (a row for `bench`)


class DenoiserCount:
    """Counts the denoiser's calls and batch rows while installed (a forward pre-hook)."""

    def __init__(self, unet):
        self.unet, self.calls, self.rows = unet, 0, 0

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.calls += 1
        self.rows += sample.shape[0]

    def __enter__(self):
        self.handle = self.unet.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def throughput(pipe, *, prompts: int = 4, images: int = 4, steps: int = STEPS, size: int = 64,
               phrase: str = "sks star", superclass: str = "star", onnx: bool = False) -> dict:
    """Images per second, the same images three ways on `pipe`: the sweep's batched loop
    (every prompt and image in one loop, `run_many`), one `engine.run` per image (as
    `generate` runs) and diffusers' own pipeline once per prompt; with `onnx`, a fourth:
    the sweep's loop with the denoiser in ONNX Runtime (its export made before the clock
    starts, as a sweep pays it once). Concept sampling (w = 7), which diffusers' pipeline
    runs too; a concept's weights do not change the time, so none is applied. Each way's
    denoiser calls and rows come with its time: the rows agree, the calls show the
    batching."""

    config = configure("concept", {}, steps)
    pairs = [prompt_pair(t, phrase, superclass) for t in WORLD[:prompts]]
    prompts = len(pairs)
    n, ways = prompts * images, {}

    def timed(name, fn, runner=None):
        calls, rows = (runner.calls, runner.rows) if runner else (0, 0)
        with DenoiserCount(pipe.unet) as count:
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
        if runner:
            count.calls, count.rows = count.calls + runner.calls - calls, count.rows + runner.rows - rows
        ways[name] = {"images_per_s": n / seconds, "seconds": seconds, "denoiser_calls": count.calls,
                      "denoiser_rows": count.rows}

    def sweep(runtime="torch"):
        return run_many(pipe, [Item(p, 0) for p in pairs], config, num_images=images, height=size, width=size,
                        concept_phrase=phrase, runtime=runtime)

    timed("sweep", sweep)
    timed("generate", lambda: [run(pipe, p, config, seed=k, num_images=1, height=size, width=size,
                                   concept_phrase=phrase) for p in pairs for k in range(images)])
    timed("diffusers", lambda: [pipe(p.concept, num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
                                     num_images_per_prompt=images, generator=torch.Generator().manual_seed(0))
                                for p in pairs])
    out = {"images": n, "prompts": prompts, "steps": steps, "size": size, "sampler": "concept", "ways": ways,
           "sweep_vs_generate": ways["generate"]["seconds"] / ways["sweep"]["seconds"],
           "sweep_vs_diffusers": ways["diffusers"]["seconds"] / ways["sweep"]["seconds"],
           "min_sweep_vs_generate": THROUGHPUT_TARGET}
    if onnx:
        factor = pipe.vae_scale_factor
        runner = onnx_denoiser(pipe.unet, (size // factor, size // factor))  # the export, off the clock
        timed("sweep onnx", lambda: sweep("onnx"), runner)
        out["sweep_onnx_vs_sweep"] = ways["sweep"]["seconds"] / ways["sweep onnx"]["seconds"]
    return out
