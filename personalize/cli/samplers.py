"""`personalize samplers [--json]`: every sampler with its parameters, defaults, ranges and cost."""

from __future__ import annotations

import json

from personalize.sampling.samplers import SAMPLERS


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true")


def command(args) -> int:
    if args.json:
        print(json.dumps([s.describe() for s in SAMPLERS.values()], indent=2))
        return 0
    for s in SAMPLERS.values():
        print(f"{s.name:<11} rows/step {s.cost_summary():<40} {s.formula}")
        for p in s.params:
            d = p.describe()
            rng = "{" + ", ".join(d["choices"]) + "}" if "choices" in d else f"[{d['range'][0]}, {d['range'][1]}]"
            print(f"    {p.name:<13} default {p.default!s:<11} {rng:<22} {p.help}")
    return 0
