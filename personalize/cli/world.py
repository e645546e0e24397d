"""`personalize world build|check`: the verb module of the trained offline world."""

from __future__ import annotations

import json

from personalize.errors import UserError
from personalize.world.build import RECIPES, SHIPPED_RECIPE, build_world
from personalize.world.check import format_table, run_check
from personalize.world.paths import shipped_world


def add_arguments(parser) -> None:
    actions = parser.add_subparsers(dest="world_action", required=True, parser_class=type(parser))
    b = actions.add_parser("build", help="render the world's data and train its models and concepts")
    b.add_argument("--out", required=True, help="a new (or empty) folder")
    b.add_argument("--quick", action="store_true", help="a tiny build in a few minutes, for tests")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--recipe", choices=sorted(RECIPES), default=SHIPPED_RECIPE,
                   help=f"what each part gets: {SHIPPED_RECIPE}, the shipped world's (default), or an earlier world's, "
                        "measured in docs/world.md")
    b.add_argument("--resume", action="store_true", help="continue an interrupted build in --out")
    b.add_argument("--no-check", action="store_true", help="skip the acceptance check after the build")
    c = actions.add_parser("check", help="measure the world's acceptance figures and print them as a table")
    c.add_argument("world", nargs="?", default=None, help="a world folder (default: the shipped world)")
    c.add_argument("--quick", action="store_true", help="a few images per figure (a smoke test, not the figures)")
    c.add_argument("--json", action="store_true")


def command(args) -> int:
    if args.world_action == "build":
        if args.quick and args.recipe != SHIPPED_RECIPE:
            raise UserError(f"--recipe {args.recipe}: --quick builds its own tiny recipe; give one or the other")
        size = None if args.quick else RECIPES[args.recipe]
        world = build_world(args.out, quick=args.quick, seed=args.seed, resume=args.resume, size=size,
                            check=not args.no_check)
        print(f"world written to {args.out} in {world['build_seconds']:.0f} s")
        if "check" in world:
            print(format_table(world["check"]))
        return 0
    folder = args.world or shipped_world()
    if folder is None:
        raise UserError("world check: no world folder given and no shipped world found")
    record = run_check(folder, quick=args.quick)
    print(json.dumps(record, indent=2) if args.json else format_table(record))
    return 0 if record["all_ok"] else 1
