"""`personalize reproduce [--world DIR] --out DIR [--quick]`: the study's sweeps on the
world (docs/world.md), then a report of every study figure, with the truth known.

The sweeps run through the sweep machinery (`sweep.py`: resumable, batched); the report
is a pure function of the sweep's `results.csv`, so a killed run, run again, finishes
the batch it lost and writes the same report. Files:

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

from personalize.concepts import apply_concept
from personalize.errors import UserError
from personalize.evaluation.pareto import AXES, curves, figure, pareto_front, summarize
from personalize.evaluation.prompt_sets import WORLD
from personalize.evaluation.sweep import RESULTS, read_rows, run_sweep
from personalize.evaluation.sweep_config import is_world, load_config
from personalize.prompts import prompt_pair
from personalize.sampling.batched import Item, run_many
from personalize.sampling.engine import run
from personalize.sampling.samplers import configure
from personalize.world.check import load_world_pipeline

STEPS = 25          # the world's DDIM steps
STUDY_STEPS = 50    # the study's grids are in steps of a 50-step run


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


def study_config(world: Path, *, quick: bool, images: int, steps: int, batch_images: int) -> dict:
    concepts = ["star"] if quick else ["star", "ball"]
    prompts = [WORLD[0], WORLD[9]] if quick else list(WORLD)  # quick: one context, one colour prompt
    return {"model": str(world), "concepts": [{"name": c} for c in concepts], "prompts": prompts,
            "seeds": [0], "steps": steps, "height": 64, "width": 64, "images_per_prompt": images,
            "batch_images": batch_images, "device": "cpu", "samplers": study_samplers(steps, quick)}


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


def findings(points: list[dict], x: str, y: str) -> list[tuple[str, str, str]]:
    """The study's qualitative claims, each with a verdict measured in the (x, y) plane:
    (claim, verdict, the number behind it)."""
    of = lambda name: [p for p in points if p["sampler"] == name]  # noqa: E731
    xy = lambda ps: [(p[x], p[y]) for p in ps]  # noqa: E731
    mixed, out = of("mixed"), []

    def add(claim, ok, detail):
        out.append((claim, "not measured" if ok is None else ("confirmed" if ok else "NOT confirmed"), detail))

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
        top = pf[-1]
        add("ProFusion exceeds concept sampling's fidelity at high r", top[y] > concept[0][y],
            f"{y} at r={top['params']['r']:g}: {top[y]:.3f}; concept sampling {concept[0][y]:.3f}")
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


def report_md(rows: list[dict], meta: dict, png_note: str | None, chart_list) -> str:
    points = point_table(rows)
    lines = ["# The study reproduced on the world", "",
             f"World: `{meta['world']}`; {meta['concepts']} concept(s), {meta['prompts']} prompt(s), "
             f"{meta['images_per_prompt']} image(s) per prompt, {meta['steps']} DDIM steps; "
             f"{len(points)} sampler points, {len(rows)} images.",
             f"Sweep wall time {meta['seconds']:.0f} s for the {meta['new_images']} images computed in the last "
             f"run ({meta['images_per_second']:.2f} images/s); metric model: {meta['metric_models']}; no DINO.",
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


def reproduce(world: str | Path, out: str | Path, *, quick: bool = False, images: int | None = None,
              steps: int | None = None, batch_images: int = 64, progress: bool = True) -> dict:
    """Run (or resume) the study's sweeps on `world` into `out/sweep`, then write the report."""

    world, out = Path(world).expanduser().resolve(), Path(out)
    if not is_world(world):
        raise UserError(f"--world: {world} is not a world (no world.json); build one with `personalize world build`")
    steps = steps or (4 if quick else STEPS)
    images = images or (1 if quick else 10)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(study_config(world, quick=quick, images=images, steps=steps,
                                                       batch_images=batch_images), sort_keys=False))
    config = load_config(config_path)
    started = time.perf_counter()
    summary = run_sweep(config, out / "sweep", progress=progress)
    seconds = time.perf_counter() - started
    rows = read_rows(out / "sweep" / RESULTS)
    meta = {"world": world.name, "concepts": len(config.concepts), "prompts": len(config.concepts[0].prompts),
            "images_per_prompt": images, "steps": steps, "seconds": seconds, "new_images": summary.images,
            "images_per_second": summary.images / seconds if summary.images else 0.0,
            "metric_models": rows[0]["metric_models"] if rows else ""}
    chart_list = charts(rows)
    write_html(out / "report.html", chart_list)
    png_note = write_pngs(out / "charts", chart_list)
    (out / "report.md").write_text(report_md(rows, meta, png_note, chart_list), encoding="utf-8")
    return meta


# ---------------------------------------------------------------------------------------
# Throughput (a row for `bench`)


def throughput(world: str | Path, *, prompts: int = 4, images: int = 4, steps: int = STEPS,
               sampler: str = "concept") -> dict:
    """Images per second on the world, the same images three ways: the sweep's batched
    loop (all prompts and images in one loop), one `engine.run` per image (as `generate`
    runs), and diffusers' own pipeline once per prompt. Concept sampling (w = 7) is what
    diffusers' pipeline can run too."""

    world = Path(world)
    pipe = load_world_pipeline(world)
    apply_concept(pipe, world / "concepts" / "star")
    config = configure(sampler, {}, steps)
    pairs = [prompt_pair(t, "sks star", "star") for t in WORLD[:prompts]]
    n = prompts * images
    t0 = time.perf_counter()
    run_many(pipe, [Item(p, 0) for p in pairs], config, num_images=images, height=64, width=64,
             concept_phrase="sks star")
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in pairs:
        for k in range(images):
            run(pipe, p, config, seed=k, num_images=1, height=64, width=64, concept_phrase="sks star")
    single = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in pairs:
        pipe(p.concept, num_inference_steps=steps, guidance_scale=7.0, height=64, width=64,
             num_images_per_prompt=images, generator=torch.Generator().manual_seed(0))
    diffusers = time.perf_counter() - t0
    return {"images": n, "steps": steps, "sampler": sampler,
            "sweep_images_per_s": n / batched, "generate_images_per_s": n / single,
            "diffusers_images_per_s": n / diffusers,
            "sweep_vs_generate": single / batched, "sweep_vs_diffusers": diffusers / batched}
