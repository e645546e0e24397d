"""Where the shipped world lives, and which base model a run uses when none is named."""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "world"
ENV = "PERSONALIZE_WORLD"


def shipped_world() -> Path | None:
    """The world folder: `$PERSONALIZE_WORLD` when set, else the one in the repository."""
    folder = Path(os.environ[ENV]).expanduser() if os.environ.get(ENV) else SHIPPED
    return folder if (folder / "model_index.json").is_file() else None


def is_world(folder: str | Path) -> bool:
    """A world folder (docs/world.md): a pipeline folder with `world.json`."""
    return (Path(folder) / "world.json").is_file()
