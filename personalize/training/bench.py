"""Training cost per method: seconds per optimizer step, peak memory and the size of the
files written, on the pipeline given (for `personalize bench`)."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from ..evaluation.memory import PeakMemory
from .loop import check_applies, check_resolution, family, train_concept
from .recipes import METHODS


def bench_images(n: int = 3, size: int = 96) -> list:
    """Smooth random colour images: inputs with the right shape and no content to learn."""

    g = torch.Generator().manual_seed(0)
    small = torch.rand(n, 3, 4, 4, generator=g)
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype("uint8")) for img in big]


def training_bench(pipe, methods=METHODS, steps: int = 3, *, resolution: int | None = None,
                   gradient_checkpointing: bool = False, seed: int = 0) -> list[dict]:
    """One short run per method; the first step (warm-up) is not timed. Each row: method,
    seconds_per_step (median), steps_per_s, peak_memory_mb (the most memory in use during
    that method's run: CUDA: peak allocated; CPU: the process's resident set, sampled),
    added_memory_mb (that peak less the memory in use when the run began: the copies,
    optimizer state and activations the method adds to the loaded model), memory_kind,
    file_bytes and file_mb (the concept files written, without references and checkpoints), device,
    resolution, steps. A method that does not apply to the model gives a row with `error`
    instead."""

    if isinstance(methods, str):
        methods = [methods]
    if steps < 2:
        raise ValueError("steps must be >= 2 (the first step is warm-up)")
    device = pipe.unet.device
    res = check_resolution(pipe, resolution)
    rows = []
    for method in methods:
        try:
            check_applies(method, family(pipe))
        except ValueError as e:
            rows.append(dict(method=method, error=str(e)))
            continue
        phrase = "<sks>" if method == "textual-inversion" else "sks thing"
        times = []
        cuda = device.type == "cuda"

        def tick(info):
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter())

        with tempfile.TemporaryDirectory(prefix="personalize-train-bench-") as tmp, PeakMemory(cuda) as memory:
            summary = train_concept(pipe, bench_images(), phrase=phrase, superclass="thing", method=method,
                                    out=f"{tmp}/c", steps=steps, resolution=res, seed=seed, progress=tick,
                                    gradient_checkpointing=gradient_checkpointing, references=[])
            file_bytes = sum(files_size(Path(tmp, "c", name)) for name in summary["files"])
        per_step = statistics.median(b - a for a, b in zip(times, times[1:]))
        rows.append(dict(method=method, seconds_per_step=per_step, steps_per_s=1 / per_step,
                         peak_memory_mb=round(memory.peak / 2 ** 20, 1),
                         added_memory_mb=round((memory.peak - memory.start) / 2 ** 20, 1),
                         memory_kind="cuda peak allocated" if cuda else "process peak RSS (sampled)",
                         file_bytes=file_bytes, file_mb=file_bytes / 2 ** 20, device=str(device), resolution=res, steps=steps,
                         gradient_checkpointing=gradient_checkpointing))
    return rows


def files_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
