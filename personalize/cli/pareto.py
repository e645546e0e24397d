"""`personalize pareto RESULTS --out FILE.html`: the IS/TS chart with the Pareto frontier."""

from __future__ import annotations

import sys
from pathlib import Path

from personalize.errors import UserError
from personalize.evaluation.pareto import RANDOM_NOTE, check_axes, figure, pareto_front, read_results, summarize


def add_arguments(parser) -> None:
    parser.add_argument("results", help="a sweep's results.csv, or the sweep folder")
    parser.add_argument("--out", required=True, help="the HTML file to write")
    parser.add_argument("--x", default="ts", help="ts (concept removed, the study's) | ts_class")
    parser.add_argument("--y", default="is", help="is (CLIP) | dino")
    parser.add_argument("--title", default=None)
    parser.add_argument("--plotlyjs", default="inline",
                        help="inline (the file works offline, about 4 MB) | cdn (small, needs the network)")


def command(args) -> int:
    check_axes(args.x, args.y)
    if args.plotlyjs not in ("inline", "cdn"):
        raise UserError(f"--plotlyjs: {args.plotlyjs!r} is not one of inline | cdn")
    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out: {out} is a folder; give an .html file name")
    rows = read_results(args.results)
    fig = figure(rows, x=args.x, y=args.y, title=args.title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(out, include_plotlyjs=True if args.plotlyjs == "inline" else "cdn")
    points = summarize(rows, args.x, args.y)
    front = set(pareto_front([(p.x, p.y) for p in points]))
    for i, p in sorted(enumerate(points), key=lambda ip: (ip[1].sampler, -ip[1].x)):
        mark = "*" if i in front else " "
        print(f"{mark} {p.sampler:<11} {p.label:<60} {args.y} {p.y:.4f}  {args.x} {p.x:.4f}  n={p.images}")
    note = f"; {RANDOM_NOTE}" if any(p.random_weights for p in points) else ""
    print(f"{len(points)} points, {len(front)} on the frontier (*) -> {out}{note}", file=sys.stderr)
    return 0
