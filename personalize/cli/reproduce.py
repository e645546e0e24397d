"""`personalize reproduce`: the study's figures on the world, as a report folder."""

from __future__ import annotations

import sys
from pathlib import Path

from personalize.errors import UserError
from personalize.evaluation.reproduce import STEPS, reproduce
from personalize.world.paths import shipped_world


def add_arguments(parser) -> None:
    parser.add_argument("--world", default=None, help="the world folder (default: the shipped world)")
    parser.add_argument("--out", required=True, help="the report folder (run again to resume)")
    parser.add_argument("--quick", action="store_true", help="a handful of points, one concept, two prompts")
    parser.add_argument("--images", type=int, default=None, help="images per prompt (default 10; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help=f"DDIM steps (default {STEPS}; quick 4)")
    parser.add_argument("--batch-images", type=int, default=64, help="images per denoiser batch")
    parser.add_argument("--runtime", default="auto",
                        help="where the denoiser runs: auto (ONNX Runtime where installed) | onnx | torch")
    parser.add_argument("--no-progress", action="store_true")


def command(args) -> int:
    world = args.world
    if world is None:
        world = shipped_world()
        if world is None:
            raise UserError("--world: no world is shipped here; build one with `personalize world build` "
                            "and give its folder")
    meta = reproduce(world, args.out, quick=args.quick, images=args.images, steps=args.steps,
                     batch_images=args.batch_images, progress=not args.no_progress, runtime=args.runtime)
    if "runs" not in meta:
        return 0  # another process of `accelerate launch`: the first one reports
    print(f"report: {Path(args.out) / 'report.md'}, {Path(args.out) / 'report.html'} "
          f"({meta['new_images']} new images, {meta['seconds']:.0f} s)", file=sys.stderr)
    return 0
