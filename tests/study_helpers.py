"""The user-study tests' shared material: `study demo` run once per test session (its
tiny sweep on the demo model is the slow part), and fresh copies of it."""

import shutil
from pathlib import Path

from personalize.cli import main

from .helpers import built_once

_made: dict = {}


def demo_study(tmp_path_factory) -> dict:
    """{"model": demo model folder, "study": a study made by `study demo`, "sweep": its sweep}."""
    if not _made:
        root, _ = built_once(tmp_path_factory, "study-demo", _make_demo_study)
        _made.update(model=root / "model", study=root / "study", sweep=root / "study" / "sweep")
    return _made


def _make_demo_study(root: Path) -> None:
    from personalize.models.demo import write_demo_model

    model = write_demo_model(root / "model", references=2, steps=2)
    assert main(["study", "demo", str(root / "study"), "--model", str(model)]) == 0


def fresh_copy(study: Path, dest: Path) -> Path:
    """The same tasks and images with no answers (a new answers file)."""
    dest.mkdir(parents=True)
    shutil.copy(study / "tasks.json", dest / "tasks.json")
    shutil.copytree(study / "media", dest / "media")
    return dest
