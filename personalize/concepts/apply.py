"""Fine-tuned concepts (`--concept PATH`) on an existing Stable Diffusion pipeline.

`detect_format` (files.py) names a concept's format from its files; `apply_concept` loads it into
the pipeline in place and returns a handle whose `remove()` restores the base model
exactly, so the app can swap concepts without reloading the base model.

Every loader first reads all of a concept's tensors and checks its keys and shapes
against the pipeline, and only then changes anything: a bad file leaves the base model
as it was. Nothing beyond plain tensors is unpickled: files are safetensors, or
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from personalize.concepts import custom_diffusion, dreambooth, lora, svdiff, textual_inversion
from personalize.concepts.changes import Plan, Undo
from personalize.concepts.files import SCALABLE, detect_format
from personalize.errors import UserError

# The concept applied to each pipeline: remove() of stacked concepts could not restore exactly.
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class AppliedConcept:
    """A concept loaded into a pipeline. `token` is the prompt token that stands for the
    concept (textual inversion, Custom Diffusion), else None."""
    format: str
    path: str
    token: str | None
    _pipe: object = field(repr=False)
    _undo: list[Undo] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Restore the base model bitwise; calling it again does nothing. A step is
        dropped only once it has run, so a failed removal can be retried."""
        while self._undo:
            self._undo[-1]()
            self._undo.pop()
        if _ACTIVE.get(self._pipe) is self:
            del _ACTIVE[self._pipe]


# One module per format, each with `prepare(pipe, path, *, phrase, scale) -> Plan`.
PREPARE: dict[str, Callable[..., Plan]] = {
    "dreambooth": dreambooth.prepare,
    "lora": lora.prepare,
    "textual_inversion": textual_inversion.prepare,
    "custom_diffusion": custom_diffusion.prepare,
    "svdiff": svdiff.prepare,
}


def apply_concept(pipe, path, *, phrase: str | None = None, scale: float = 1.0) -> AppliedConcept:
    """Load the concept at `path` into `pipe` in place.

    `phrase` is the concept phrase: for textual inversion it becomes the new token (by
    default the file's own token); for Custom Diffusion it must contain the modifier
    token(s). `scale` weighs a LoRA or SVDiff concept (1 = as trained).
    """
    path = Path(path).expanduser()
    if not hasattr(pipe, "unet") or not hasattr(pipe, "text_encoder") or getattr(pipe, "text_encoder_2", None):
        raise UserError(f"--concept: concepts load onto Stable Diffusion 1.x/2.x pipelines; "
                        f"this model is a {type(pipe).__name__}")
    if _ACTIVE.get(pipe) is not None:
        raise UserError(f"--concept: {_ACTIVE[pipe].path} is still applied to this model; remove it first")
    fmt = detect_format(path)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UserError(f"--concept-scale: {scale!r} must be a finite number")
    if scale != 1.0 and fmt not in SCALABLE:
        raise UserError(f"--concept-scale: {fmt} concepts have no scale (only {' and '.join(SCALABLE)}); use 1")
    plan = PREPARE[fmt](pipe, path, phrase=phrase, scale=float(scale))  # reads and checks; changes nothing
    concept = AppliedConcept(fmt, str(path), plan.token, pipe)
    try:
        for step in plan.steps:
            concept._undo.append(step())
    except BaseException:
        concept.remove()
        raise
    _ACTIVE[pipe] = concept
    return concept


