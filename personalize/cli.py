"""Command line: `python -m personalize VERB ...` (verbs and options per interfaces.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


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


def build_parser() -> Parser:
    parser = Parser(prog="personalize", description="Sampling methods for personalized text-to-image models.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)

    p = verbs.add_parser("demo-model", help="write the offline demo model")
    p.add_argument("out")

    p = verbs.add_parser("samplers", help="list the samplers, their parameters and costs")
    p.add_argument("--json", action="store_true")

    g = verbs.add_parser("generate", help="one run of one sampler")
    g.add_argument("--model", default=None, help="base pipeline folder or hub id (default: the offline demo model)")
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
    g.add_argument("--save-latents", action="store_true")
    g.add_argument("--save-steps", action="store_true")
    g.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    g.add_argument("--out", required=True)

    for verb, (module, help_) in VERB_MODULES.items():
        add = _load_verb(module)
        p = verbs.add_parser(verb, help=help_)
        if add is not None:
            add.add_arguments(p)
    return parser


# Verbs that live in their own modules: each module has `add_arguments(parser)` and
# `command(args) -> int`, and imports heavy packages only inside `command`.
VERB_MODULES = {
    "sweep": ("personalize.sweep", "a resumable hyperparameter sweep with metrics"),
    "pareto": ("personalize.pareto", "the IS/TS chart with one curve per sampler and the frontier"),
    "study": ("personalize.study", "pairwise user study: build, demo, report"),
    "bench": ("personalize.bench", "the performance benchmark"),
}


def _load_verb(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return None


def cmd_samplers(args) -> int:
    from .samplers import SAMPLERS

    if args.json:
        print(json.dumps([s.describe() for s in SAMPLERS.values()], indent=2))
        return 0
    for s in SAMPLERS.values():
        print(f"{s.name:<11} rows/step {s.rows:<40} {s.rule}")
        for p in s.params:
            d = p.describe()
            rng = "{" + ", ".join(d["choices"]) + "}" if "choices" in d else f"[{d['range'][0]}, {d['range'][1]}]"
            print(f"    {p.name:<13} default {p.default!s:<11} {rng:<22} {p.help}")
    return 0


def cmd_generate(args) -> int:
    from .runcard import StepRecorder, check_out_dir, write_run
    from .runs import Request, check, execute

    req = Request(prompt=args.prompt, sampler=args.sampler, params=parse_set(args.set), model=args.model,
                  concept=args.concept, concept_scale=args.concept_scale, concept_phrase=args.concept_phrase, superclass=args.superclass,
                  negative_prompt=args.negative_prompt, steps=args.steps, seed=args.seed,
                  num_images=args.num_images, height=args.height, width=args.width, device=args.device,
                  dtype=args.dtype, scheduler=args.scheduler)
    check_out_dir(args.out, args.overwrite)
    prep = check(req)
    recorder = StepRecorder() if args.save_steps else None
    result, card = execute(prep, callback=recorder)
    card = write_run(args.out, card, result.images, latents=result.latents if args.save_latents else None,
                     steps=recorder, overwrite=args.overwrite)
    print(f"{len(card['images'])} image(s), {card['denoiser_rows']} denoiser rows, "
          f"{card['seconds']:.1f} s -> {args.out}")
    return 0


def cmd_demo_model(args) -> int:
    from .demo_model import write_demo_model

    out = write_demo_model(args.out)
    print(f"demo model written to {out}")
    return 0


COMMANDS = {"samplers": cmd_samplers, "generate": cmd_generate, "demo-model": cmd_demo_model}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        if args.verb in VERB_MODULES:
            module = _load_verb(VERB_MODULES[args.verb][0])
            if module is None:
                raise UserError(f"{args.verb}: this verb is not available yet")
            return module.command(args)
        return COMMANDS[args.verb](args)
    except UserError as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
