"""`personalize demo-model DIR`: write the offline demo model to a folder."""

from __future__ import annotations

from personalize.models.demo import write_demo_model


def add_arguments(parser) -> None:
    parser.add_argument("out")


def command(args) -> int:
    out = write_demo_model(args.out)
    print(f"demo model written to {out}")
    return 0
