"""`pareto RESULTS --out FILE.html`: the study's chart of image similarity against text
similarity, one curve per sampler ordered by its hyperparameter, and the Pareto
frontier over every point.

`pareto_front` and `summarize` are pure functions; `figure(rows)` builds the plotly figure
(the app calls it too); the verb reads a sweep's `results.csv` and writes HTML.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go

from personalize.errors import UserError
from personalize.evaluation.sweep import KEY, RESULTS, read_rows

AXES = {"is": "IS: CLIP image similarity", "dino": "DINO image similarity",
        "ts": "TS: CLIP text similarity (concept removed)", "ts_class": "TS with the class noun",
        "concept_fidelity": "concept fidelity (world judge)", "context_fidelity": "context fidelity (world judge)"}
# The judge's fidelity columns (world sweeps, docs/world.md) plot like IS and TS.
X_CHOICES, Y_CHOICES = ("ts", "ts_class", "context_fidelity"), ("is", "dino", "concept_fidelity")
# Per sampler: the parameters a curve runs along (sorted by them), and those that start a
# new curve (the study draws one multi-stage curve per t_sw, one masked curve per t_sw).
CURVES = {
    "concept": (("w",), ()),
    "superclass": (("w",), ()),
    "mixed": (("w_s", "w_c"), ()),
    "switching": (("t_sw",), ("w",)),
    "multistage": (("w_s", "w_c"), ("t_sw",)),
    "masked": (("q",), ("t_sw", "mask_source")),
    "profusion": (("r", "refine_steps"), ()),
    "photoswap": (("t_sf", "t_cm", "t_sm"), ("w",)),
}
RANDOM_NOTE = "metrics from RANDOM-WEIGHT models: not the study's numbers"


# ---------------------------------------------------------------------------------------
# The frontier


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """`a` is at least as good as `b` in both coordinates and better in one (maximize both)."""
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_front(points) -> list[int]:
    """Indices of the points of `points` ((x, y) pairs) that no other point dominates,
    sorted by x, largest first. Equal points do not dominate each other, so duplicates on
    the frontier are all kept. O(n log n): sweep from the largest x down, keeping the best
    y seen at any strictly larger x. Coordinates must be finite."""
    if not all(math.isfinite(c) for pt in points for c in pt):
        raise ValueError("pareto_front: every coordinate must be a finite number")
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for _, group in itertools.groupby(order, key=lambda i: points[i][0]):
        group = list(group)  # one x, largest y first
        top = points[group[0]][1]
        if top > best_y:  # no point at a larger x reaches this y; at this x only ties do
            front += [i for i in group if points[i][1] == top]
            best_y = top
    return front


# ---------------------------------------------------------------------------------------
# From rows to points


@dataclass(frozen=True)
class CurvePoint:
    sampler: str
    params: dict
    x: float         # mean over (concept, prompt) groups of each group's mean
    y: float
    x_std: float     # spread of the group means
    y_std: float
    groups: int      # (concept, prompt) pairs
    images: int
    random_weights: bool

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.params.items())


def _short(v) -> str:
    if isinstance(v, list):
        return f"[{len(v)} per-step values]"
    return f"{v:g}" if isinstance(v, float) else str(v)


def summarize(rows, x: str = "ts", y: str = "is") -> list[CurvePoint]:
    """One point per (sampler, parameters): the mean over prompts (docs/evaluation.md) of each
    (concept, prompt)'s mean over its images, and the spread of those means."""
    by_point: dict[tuple, dict[tuple, list]] = defaultdict(lambda: defaultdict(list))
    random = defaultdict(bool)
    for k, row in enumerate(rows):
        key = (row["sampler"], row["params"])
        by_point[key][(row["concept"], row["prompt"])].append((_number(row, x, k), _number(row, y, k)))
        random[key] |= str(row.get("random_weights", "")).lower() == "true"
    points = []
    for (sampler, params), groups in by_point.items():
        xs = [_mean([v[0] for v in g]) for g in groups.values()]
        ys = [_mean([v[1] for v in g]) for g in groups.values()]
        points.append(CurvePoint(sampler, json.loads(params), _mean(xs), _mean(ys), _std(xs), _std(ys),
                                 len(groups), sum(len(g) for g in groups.values()), random[(sampler, params)]))
    return points


def _number(row: dict, column: str, k: int) -> float:
    value = row.get(column)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"results row {k + 1}: column {column!r} is {value!r}, not a number"
                        + (" (the sweep ran without DINO: metrics.dino: none)" if column == "dino" and value == ""
                           else "")
                        + (" (fidelity columns come from sweeps on a world model)"
                           if column.endswith("_fidelity") and value == "" else "")) from None
    if not math.isfinite(v):
        raise UserError(f"results row {k + 1}: column {column!r} is {value!r}, not a finite number")
    return v


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _std(v: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    if len(v) < 2:
        return 0.0
    m = _mean(v)
    return math.sqrt(sum((a - m) ** 2 for a in v) / (len(v) - 1))


def curves(points: list[CurvePoint]) -> list[tuple[str, list[CurvePoint]]]:
    """The points grouped into curves (see CURVES), each sorted along its parameter."""
    grouped: dict[tuple, list[CurvePoint]] = defaultdict(list)
    for p in points:
        along, split = CURVES.get(p.sampler, ((), ()))
        grouped[(p.sampler, tuple((k, json.dumps(p.params.get(k))) for k in split))].append(p)
    out = []
    for (sampler, split), members in sorted(grouped.items()):
        along = CURVES.get(sampler, ((), ()))[0] or tuple(members[0].params)
        members.sort(key=lambda p: tuple(_sort_key(p.params.get(k)) for k in along))
        name = sampler + "".join(f" {k}={_short(json.loads(v))}" for k, v in split)
        out.append((name, members))
    return out


def _sort_key(v):
    """Numbers in order; anything else (per-step lists, text) after them, by its text."""
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, json.dumps(v))


# ---------------------------------------------------------------------------------------
# The figure


def figure(rows, *, x: str = "ts", y: str = "is", title: str | None = None):
    """The chart as a plotly Figure: a curve per sampler, the frontier over all points,
    hover with parameters, means and spreads. Random-weight metrics are labelled in the
    title and on every trace made from them."""

    check_axes(x, y)
    points = summarize(rows, x, y)
    fig = go.Figure()
    for name, members in curves(points):
        random = any(p.random_weights for p in members)
        fig.add_trace(go.Scatter(
            x=[p.x for p in members], y=[p.y for p in members], mode="lines+markers",
            name=name + (" [random weights]" if random else ""),
            text=[hover(p, x, y) for p in members], hovertemplate="%{text}<extra></extra>"))
    front = [points[i] for i in pareto_front([(p.x, p.y) for p in points])]
    fig.add_trace(go.Scatter(
        x=[p.x for p in front], y=[p.y for p in front], mode="lines+markers", name="Pareto frontier",
        line=dict(color="black", dash="dash"),
        marker=dict(symbol="circle-open", size=14, color="black"),
        text=[hover(p, x, y) for p in front], hovertemplate="frontier<br>%{text}<extra></extra>"))
    any_random = any(p.random_weights for p in points)
    heading = title or f"{AXES[y]} vs {AXES[x]}"
    if any_random:
        heading += f"<br><sup>{RANDOM_NOTE}</sup>"
    fig.update_layout(title=heading, xaxis_title=AXES[x], yaxis_title=AXES[y], hovermode="closest",
                      legend_title_text="sampler", template="plotly_white")
    return fig


def hover(p: CurvePoint, x: str, y: str) -> str:
    lines = [f"<b>{p.sampler}</b>", p.label or "(defaults)",
             f"{y}: {p.y:.4f} ± {p.y_std:.4f}", f"{x}: {p.x:.4f} ± {p.x_std:.4f}",
             f"{p.images} images, {p.groups} concept×prompt pairs (± = their spread)"]
    if p.random_weights:
        lines.append(RANDOM_NOTE)
    return "<br>".join(lines)


def check_axes(x: str, y: str) -> None:
    if x not in X_CHOICES:
        raise UserError(f"--x: {x!r} is not one of {' | '.join(X_CHOICES)}")
    if y not in Y_CHOICES:
        raise UserError(f"--y: {y!r} is not one of {' | '.join(Y_CHOICES)}")


# ---------------------------------------------------------------------------------------
# Reading results


def read_results(path: str | Path) -> list[dict]:
    """The rows of a sweep's results.csv (or of the sweep folder that holds it)."""

    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        raise UserError(f"pareto: {path} does not exist (give a sweep's results.csv or its folder)")
    rows = read_rows(path)
    if not rows:
        raise UserError(f"pareto: {path} has no rows")
    missing = [c for c in KEY + ("is", "ts") if c not in rows[0]]
    if missing:
        raise UserError(f"pareto: {path} is not a sweep's results table (no column {missing[0]!r})")
    return rows
