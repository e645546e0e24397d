"""Where the shipped world lives, and which base model a run uses when none is named."""

from __future__ import annotations

import os
from pathlib import Path

from personalize.errors import UserError

SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "world"
ENV = "PERSONALIZE_WORLD"


def shipped_world() -> Path | None:
    """The world folder: `$PERSONALIZE_WORLD` when set, else the one in the repository."""
    folder = Path(os.environ[ENV]).expanduser() if os.environ.get(ENV) else SHIPPED
    return folder if (folder / "model_index.json").is_file() else None


def is_world(folder: str | Path) -> bool:
    """A world folder (docs/world.md): a pipeline folder with `world.json`."""
    return (Path(folder) / "world.json").is_file()


def world_concept(model: str, name: str | None = None) -> dict | None:
    """A world's own concept (docs/world.md), `concepts/<name>` (the first by name when
    None): its folder, phrase, superclass and reference images; None for other models."""

    folder = Path(model)
    if not (folder.is_dir() and is_world(folder)):
        return None
    names = sorted(p.name for p in (folder / "concepts").iterdir() if (p / "concept.json").is_file())
    if not names:
        return None
    name = name or names[0]
    if name not in names:
        raise UserError(f"--world-concept: {name!r} is not one of the world's concepts ({', '.join(names)})")
    from personalize.models.loading import read_concept_json  # torch and diffusers, only when needed

    meta = read_concept_json(folder / "concepts" / name)
    return {"weights": str(folder / "concepts" / name), "phrase": meta["phrase"], "superclass": meta["superclass"],
            "references": meta.get("references", [])}
