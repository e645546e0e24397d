"""The command line, `personalize VERB ...` (or `python -m personalize VERB ...`).

Every verb is a module with `add_arguments(parser)` and `command(args) -> int`, listed by
module path in `VERBS`. A verb module keeps heavy imports (torch, diffusers) inside
`command`, so building the parser stays cheap. A verb whose module is not installed is
still listed and answers that it is not available yet.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from personalize.errors import UserError

# verb -> (module path, one-line help)
VERBS = {
    "demo-model": ("personalize.cli.demo_model", "write the offline demo model"),
    "samplers": ("personalize.cli.samplers", "list the samplers, their parameters and costs"),
    "generate": ("personalize.cli.generate", "one run of one sampler"),
    "sweep": ("personalize.cli.sweep", "a resumable hyperparameter sweep with metrics"),
    "pareto": ("personalize.cli.pareto", "the IS/TS chart with one curve per sampler and the frontier"),
    "study": ("personalize.cli.study", "pairwise user study: build, demo, report"),
    "bench": ("personalize.cli.bench", "the performance benchmark"),
    "train": ("personalize.training.cli", "fine-tune a concept"),
    "world": ("personalize.world.cli", "the world model"),
    "reproduce": ("personalize.evaluation.reproduce", "reproduce the study's figures"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr and exit status 2."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}")


def load_verb(module: str):
    """The verb's module, or None when that module (not one it imports) does not exist."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise
        return None


def build_parser() -> Parser:
    parser = Parser(prog="personalize", description="Sampling methods for personalized text-to-image models.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)
    for verb, (module, help_) in VERBS.items():
        found = load_verb(module)
        p = verbs.add_parser(verb, help=help_ if found is not None else f"{help_} (not available yet)")
        if found is not None:
            found.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = build_parser().parse_args(argv)
        module = load_verb(VERBS[args.verb][0])
        if module is None:
            raise UserError(f"{args.verb}: this verb is not available yet")
        return module.command(args)
    except UserError as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
