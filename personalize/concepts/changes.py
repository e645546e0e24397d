"""What applying a concept is made of: checked changes to a pipeline (`Plan`, a list
of `Step`s), each returning its own undo, so that removing a concept restores the base
model bitwise."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from personalize.concepts.files import fail

Undo = Callable[[], None]
Step = Callable[[], Undo]  # changes the pipeline and returns how to change it back


@dataclass
class Plan:
    """A checked concept: the steps that apply it, none run yet."""
    steps: list[Step]
    token: str | None = None


def swap_step(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Step:
    """Replace the data of each (parameter or buffer, new value); undo puts the original
    tensors back, so the restored model is bitwise the base model."""
    def apply() -> Undo:
        saved = []

        def undo() -> None:
            with torch.no_grad():
                for target, original in reversed(saved):
                    target.data = original.to(target.device)

        try:
            with torch.no_grad():
                for target, new in pairs:
                    # Originals wait on the CPU so a concept on a GPU does not double its memory there.
                    saved.append((target, target.data.to("cpu")))
                    target.data = new.to(device=target.device, dtype=target.dtype)
        except BaseException:  # e.g. out of memory half-way: put back what was swapped
            undo()
            raise
        return undo
    return apply


def check_shape(path, key: str, got: torch.Size, want: torch.Size) -> None:
    if tuple(got) != tuple(want):
        raise fail(path, f"{key} has shape {tuple(got)}, but this model expects {tuple(want)} "
                         "(a concept made for another base model?)")


def checked_pairs(path, pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[tuple]:
    """Shape-check (key, target, new) triples; a target listed twice would break undo."""
    seen = set()
    for key, target, new in pairs:
        check_shape(path, key, new.shape, target.shape)
        if new.is_floating_point() != target.is_floating_point():
            raise fail(path, f"{key} holds {new.dtype} values where this model has {target.dtype}")
        if new.is_floating_point() and not torch.isfinite(new).all():
            raise fail(path, f"{key} holds NaN or infinite values")
        if id(target) in seen:
            raise fail(path, f"{key} changes a weight that another entry already changes")
        seen.add(id(target))
    return [(target, new) for _, target, new in pairs]


def model_key(model, key: str) -> str:
    """transformers 5 flattened CLIPTextModel: older files still say `text_model.`."""
    if key.startswith("text_model.") and not hasattr(model, "text_model"):
        return key[len("text_model."):]
    return key


