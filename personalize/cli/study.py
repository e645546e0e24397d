"""`personalize study build|demo|report|export`: the pairwise user study."""

from __future__ import annotations

import json
import sys

from personalize.errors import UserError
from personalize.study.build import build_study, make_demo, parse_pairs
from personalize.study.report import format_report
from personalize.study.tasks import Study


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, parser_class=type(parser))
    b = actions.add_parser("build", help="a pairwise study from a sweep's images")
    b.add_argument("sweep", help="the sweep folder (results.csv, images/)")
    b.add_argument("--pairs", required=True, help="method pairs A:B,...; a method is a sampler, or sampler[point]")
    b.add_argument("--out", required=True, help="the new study folder")
    b.add_argument("--attention-checks", type=int, default=0, help="attention-check tasks (real vs blank image)")
    b.add_argument("--repeats", type=int, default=0, help="pair tasks shown twice (sides flipped)")
    b.add_argument("--per-pair", type=int, default=None, help="at most this many tasks per pair (a random sample)")
    b.add_argument("--references", action="append", default=[], metavar="CONCEPT=PATH",
                   help="real images of a concept (a folder or a file); default: its model's concept.json")
    b.add_argument("--seed", type=int, default=0, help="seed of the left/right and sampling draws")

    d = actions.add_parser("demo", help="a small ready study on the default model")
    d.add_argument("out", help="the new study folder")
    d.add_argument("--model", default=None, help="the base model folder (default: see loading.default_model)")

    r = actions.add_parser("report", help="the win-rate table of the answers so far")
    r.add_argument("study", help="the study folder")
    r.add_argument("--json", action="store_true", help="one JSON object")
    r.add_argument("--db", default=None, help="the answers file (default: STUDY_DIR/answers.sqlite)")
    r.add_argument("--exclude", action="append", default=[], metavar="PARTICIPANT",
                   help="leave out one participant's answers (repeatable)")
    r.add_argument("--max-failures", type=int, default=0,
                   help="attention checks a participant may fail and still be counted")
    r.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    e = actions.add_parser("export", help="every answer as CSV")
    e.add_argument("study", help="the study folder")
    e.add_argument("--out", required=True, help="the CSV file to write")
    e.add_argument("--db", default=None, help="the answers file (default: STUDY_DIR/answers.sqlite)")


def _parse_references(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--references: {item!r} is not CONCEPT=PATH")
        out[name.strip()] = path.strip()
    return out


def command(args) -> int:
    if args.action == "build":
        data = build_study(args.sweep, parse_pairs(args.pairs), args.out, attention_checks=args.attention_checks,
                           repeats=args.repeats, per_pair=args.per_pair, seed=args.seed,
                           references=_parse_references(args.references))
        print(_built(data, args.out))
    elif args.action == "demo":
        print(_built(make_demo(args.out, model=args.model), args.out))
    elif args.action == "report":
        if args.resamples < 1:
            raise UserError(f"--resamples: {args.resamples} must be >= 1")
        report = Study(args.study, db=args.db).report(exclude=args.exclude, max_failures=args.max_failures,
                                                      resamples=args.resamples, seed=args.seed)
        print(json.dumps(report, indent=2) if args.json else format_report(report))
    elif args.action == "export":
        n = Study(args.study, db=args.db).export(args.out)
        print(f"{n} answers -> {args.out}", file=sys.stderr)
    return 0


def _built(data: dict, out) -> str:
    kinds = [t["kind"] for t in data["tasks"]]
    return (f"{len(kinds)} tasks ({kinds.count('pair')} pairs, {kinds.count('repeat')} repeats, "
            f"{kinds.count('attention')} attention checks) over {len(data['pairs'])} method pair(s) -> {out}; "
            f"serve it with `python app.py --study {out}`")
