"""Training cost per method: seconds per optimizer step and peak memory, on the pipeline
given (for `personalize bench`)."""

from __future__ import annotations

import resource
import statistics
import tempfile
import time

import torch

from .recipes import METHODS


def bench_images(n: int = 3, size: int = 96) -> list:
    """Smooth random colour images: inputs with the right shape and no content to learn."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    small = torch.rand(n, 3, 4, 4, generator=g)
    big = torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype("uint8")) for img in big]


def training_bench(pipe, methods=METHODS, steps: int = 3, *, resolution: int | None = None,
                   gradient_checkpointing: bool = False, seed: int = 0) -> list[dict]:
    """One short run per method; the first step (warm-up) is not timed. Each row: method,
    seconds_per_step (median), steps_per_s, peak_memory_mb (CUDA: peak allocated during the
    run; CPU: the process's peak resident set so far, which only ever grows), memory_kind,
    device, resolution, steps."""
    from .loop import check_applies, check_resolution, family, train_concept

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
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

        def tick(info):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter())

        with tempfile.TemporaryDirectory(prefix="personalize-train-bench-") as tmp:
            train_concept(pipe, bench_images(), phrase=phrase, superclass="thing", method=method, out=f"{tmp}/c",
                          steps=steps, resolution=res, seed=seed, progress=tick,
                          gradient_checkpointing=gradient_checkpointing, references=[])
        per_step = statistics.median(b - a for a, b in zip(times, times[1:]))
        if device.type == "cuda":
            peak, kind = torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda peak allocated"
        else:
            peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"
        rows.append(dict(method=method, seconds_per_step=per_step, steps_per_s=1 / per_step,
                         peak_memory_mb=round(peak, 1), memory_kind=kind, device=str(device), resolution=res,
                         steps=steps, gradient_checkpointing=gradient_checkpointing))
    return rows
