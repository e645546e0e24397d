"""`personalize generate`: one run of one sampler, written as images and a run card."""

from __future__ import annotations

import json
import sys

from personalize.errors import UserError
from personalize.runs.request import Request, check, execute
from personalize.runs.runcard import StepRecorder, check_out_dir, write_run
from personalize.world.paths import world_concept


def add_arguments(g) -> None:
    g.add_argument("--model", default=None, help="base pipeline folder or hub id (default: the study's SD 2 base on a CUDA GPU, else the shipped world model, else the offline demo model)")
    g.add_argument("--concept", default=None, help="fine-tuned concept: DreamBooth folder, LoRA, textual "
                   "inversion, Custom Diffusion or SVDiff file/folder (autodetected)")
    g.add_argument("--concept-scale", type=float, default=1.0, help="strength of a LoRA or SVDiff concept")
    g.add_argument("--concept-phrase", default=None)
    g.add_argument("--superclass", default=None)
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--sampler", default="concept")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--scheduler", default="model", help="model (the model's own) | ddim")
    g.add_argument("--runtime", default="torch",
                   help="torch | onnx (ONNX Runtime, CPU float32: about twice as fast on a small model, "
                        "after a few seconds' export) | auto (onnx where it can run)")
    g.add_argument("--save-latents", action="store_true")
    g.add_argument("--save-steps", action="store_true")
    g.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    g.add_argument("--out", required=True)


def own_concept(args) -> str | None:
    """On a world with neither --concept nor --concept-phrase, the world's own first concept,
    as the app starts (a world's base model has no concept.json to name a phrase)."""
    if args.concept_phrase is not None:
        return None
    model = args.model
    if model is None:
        from personalize.models.loading import default_model
        model, _reason = default_model()
    world = world_concept(model)
    if world is None:
        return None
    print(f"concept: {world['phrase']!r}, the world's own ({world['weights']}); --concept names another",
          file=sys.stderr)
    return world["weights"]


def parse_set(items: list[str]) -> dict:
    """`--set KEY=VALUE` pairs; a value is JSON when it parses as JSON (numbers, lists),
    else a plain string."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set: {item!r} is not KEY=VALUE")
        try:
            params[key.strip()] = json.loads(value)
        except ValueError:
            params[key.strip()] = value
    return params


def command(args) -> int:
    req = Request(prompt=args.prompt, sampler=args.sampler, params=parse_set(args.set), model=args.model,
                  concept=args.concept or own_concept(args), concept_scale=args.concept_scale,
                  concept_phrase=args.concept_phrase,
                  superclass=args.superclass, negative_prompt=args.negative_prompt, steps=args.steps,
                  seed=args.seed, num_images=args.num_images, height=args.height, width=args.width,
                  device=args.device, dtype=args.dtype, scheduler=args.scheduler, runtime=args.runtime)
    check_out_dir(args.out, args.overwrite)
    prep = check(req)
    recorder = StepRecorder() if args.save_steps else None
    result, card = execute(prep, callback=recorder)
    card = write_run(args.out, card, result.images, latents=result.latents if args.save_latents else None,
                     steps=recorder, overwrite=args.overwrite)
    print(f"{len(card['images'])} image(s), {card['denoiser_rows']} denoiser rows, "
          f"{card['seconds']:.1f} s -> {args.out}")
    return 0
