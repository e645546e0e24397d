"""The command line, `personalize VERB ...` (or `python -m personalize VERB ...`).

Every verb is a module with `add_arguments(parser)` and `command(args) -> int`, listed by
module path in `VERBS`. Only the module of the verb on the command line is imported:
library modules import torch and diffusers at their top, and `personalize --help` should
not wait for them. A verb whose module is not installed is still listed and answers that
it is not available yet.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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
    "train": ("personalize.cli.train", "fine-tune a concept"),
    "world": ("personalize.cli.world", "the world model"),
    "reproduce": ("personalize.cli.reproduce", "reproduce the study's figures"),
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


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def chosen_verb(argv: list[str]) -> str | None:
    """The verb named on a command line (its first word that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(verb: str | None = None) -> Parser:
    """The parser with every verb listed; `verb`'s own options are added when it is named
    (all verbs' options when it is None)."""
    parser = Parser(prog="personalize", description="Sampling methods for personalized text-to-image models.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)
    for name, (module, help_) in VERBS.items():
        found = _installed(module)
        p = verbs.add_parser(name, help=help_ if found else f"{help_} (not available yet)")
        if found and verb in (None, name):
            loaded = load_verb(module)
            if loaded is not None:
                loaded.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser(chosen_verb(argv) or "").parse_args(argv)
        module = load_verb(VERBS[args.verb][0])
        if module is None:
            raise UserError(f"{args.verb}: this verb is not available yet")
        return module.command(args)
    except UserError as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return 2
