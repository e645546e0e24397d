"""The performance benchmark behind `personalize bench`.

In one process and on one set of components, diffusers' own `StableDiffusionPipeline`
(concept prompt, CFG) and then every sampler generate one image each; after warm-up
rounds, several measured rounds follow and the median counts. Methods run interleaved
(one of each per round), so a slower spell of a shared machine hits all of them alike.
Reported per method: seconds per image, denoiser batch rows, seconds per row and peak
memory (process RSS on the CPU, max allocated on CUDA), and the ratios of medians
against the targets in `TARGETS`.

Heavy packages (torch, diffusers) are imported inside functions: the command line
imports this module to build its parser.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass

from personalize.errors import UserError

DIFFUSERS = "diffusers"           # the baseline's name in reports
TEMPLATE = "a photo of a {} on the beach"
S_PER_ROW_TOLERANCE = 0.10        # every sampler's seconds per row within 10% of concept's
ARCH_CHOICES = ("mid", "sd2", "demo")
GPU_COMMAND = "python -m personalize bench --arch sd2 --device cuda --dtype float16 --size 512 --steps 50"


@dataclass(frozen=True)
class Target:
    """`numerator / denominator` of `measure` ("s" or "peak_mb") must be at most `limit`."""
    numerator: str
    denominator: str
    limit: float
    measure: str = "s"

    @property
    def name(self) -> str:
        suffix = "" if self.measure == "s" else f" ({self.measure})"
        return f"{self.numerator} / {self.denominator}{suffix}"


TARGETS = (
    Target("concept", DIFFUSERS, 1.03),
    Target("switching", "concept", 1.05),
    Target("mixed", "concept", 1.5),
    Target("masked", "mixed", 1.15),
    Target("photoswap", "mixed", 1.45),
    Target("profusion", "mixed", 1.8),
    Target("masked", "mixed", 1.05, "peak_mb"),
)


# -- measuring ----------------------------------------------------------------------------

def run_bench(pipe, *, model: str, names: list[str], device: str = "cpu", dtype: str = "float32", steps: int = 10,
              size: int | None = None, repeats: int = 3, warmup: int = 1, seed: int = 0, progress=None) -> dict:
    """Time diffusers' pipeline and the samplers `names` on `pipe`; returns the report
    (the `--json` object)."""
    from personalize.sampling.backbones import default_size

    size = size or default_size(pipe)[0]
    jobs, configs = make_jobs(pipe, names, steps=steps, size=size, seed=seed)
    load_start = load_average()
    runs: dict[str, list] = {name: [] for name in jobs}
    rounds = warmup + repeats
    for r in range(rounds):
        for name, job in jobs.items():
            m = measure(job, device)
            if r >= warmup:
                runs[name].append(m)
            if progress is not None:
                progress(f"round {r + 1}/{rounds}{' (warm-up)' if r < warmup else ''}: {name} {m.seconds:.2f} s")
    results = {name: summarize(ms) for name, ms in runs.items()}
    for name in names:
        results[name]["params"] = dict(configs[name].params)
    report = {"device": device, "model": model, "steps": steps, "size": size, "dtype": dtype,
              "repeats": repeats, "warmup": warmup, "seed": seed,
              "diffusers_concept_s": results[DIFFUSERS]["s"], DIFFUSERS: results.pop(DIFFUSERS),
              "samplers": results, "machine": dict(machine(device), load_start=load_start, load_end=load_average())}
    report["ratios"] = ratios(report)
    return report


@dataclass(frozen=True)
class Measurement:
    seconds: float
    rows: int
    peak_bytes: int


def make_jobs(pipe, names: list[str], *, steps: int, size: int, seed: int) -> tuple[dict, dict]:
    """name -> a function that generates one image and returns the denoiser rows it used,
    and sampler name -> its config: the defaults (step counts scaled to `steps` by
    `configure`, so every stage keeps its share of the trajectory and of the cost)."""
    import inspect

    import torch

    from personalize.sampling import engine
    from personalize.models.demo import DEMO_CONCEPT
    from personalize.prompts import prompt_pair
    from personalize.sampling.samplers import configure

    prompts = prompt_pair(TEMPLATE, DEMO_CONCEPT["phrase"], DEMO_CONCEPT["superclass"])
    # diffusers' own pipeline of the same family, on the very same component objects.
    extra = {"requires_safety_checker": False} if "requires_safety_checker" in inspect.signature(
        type(pipe)).parameters else {}
    reference = type(pipe)(**pipe.components, **extra)
    reference.set_progress_bar_config(disable=True)

    def diffusers_job() -> int:
        # guidance_scale 7 is concept's default w; with it diffusers runs CFG: 2 rows per step.
        reference(prompts.concept, num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
                  generator=torch.Generator("cpu").manual_seed(seed))
        return 2 * steps

    def sampler_job(config):
        def job() -> int:
            return engine.run(pipe, prompts, config, seed=seed, height=size, width=size,
                              concept_phrase=DEMO_CONCEPT["phrase"]).rows
        return job

    configs = {name: configure(name, {}, steps) for name in names}
    jobs = {DIFFUSERS: diffusers_job, **{name: sampler_job(config) for name, config in configs.items()}}
    return jobs, configs


def measure(job, device: str) -> Measurement:
    import torch

    cuda = str(device).startswith("cuda")
    with PeakMemory(cuda) as memory:
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        rows = job()
        if cuda:
            torch.cuda.synchronize()  # kernels run asynchronously; wait for the last one
        seconds = time.perf_counter() - started
    return Measurement(seconds, rows, memory.peak)


class PeakMemory:
    """Context manager: `peak` is the most memory in use while its block ran, in bytes.

    CUDA: torch's max allocated. Otherwise the process's resident set size, read by a
    thread every few milliseconds (no dependency needed on Linux)."""

    INTERVAL_S = 0.002

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return self
        release_free_memory()
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.INTERVAL_S):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        return False


def rss_bytes() -> int:
    """The process's resident set size now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        # No /proc (macOS): the lifetime peak is the best the standard library offers.
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def release_free_memory() -> None:
    """Give freed memory back to the OS before a CPU measurement: glibc keeps freed heap
    pages mapped, and each method's RSS peak would otherwise include earlier methods'.
    (No gc.collect(): tensors are freed by reference counting, and a full collection
    costs half a second with diffusers and transformers loaded.)"""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may then overstate a method's own peak


# -- reporting ----------------------------------------------------------------------------

def summarize(measurements: list[Measurement]) -> dict:
    """One method's entry: median seconds, rows, seconds per row, peak over the repeats."""
    rows = {m.rows for m in measurements}
    if len(rows) != 1:
        raise RuntimeError(f"denoiser rows differ between repeats: {sorted(rows)}")
    s = statistics.median(m.seconds for m in measurements)
    (n,) = rows
    return {"s": s, "rows": n, "s_per_row": s / n, "peak_mb": max(m.peak_bytes for m in measurements) / 2 ** 20,
            "runs_s": [m.seconds for m in measurements]}


def ratios(report: dict) -> dict:
    """Every target whose methods were timed: {name: {value, max, (min), met}}, computed
    from the report's own medians."""
    entries = dict(report["samplers"], **{DIFFUSERS: report[DIFFUSERS]})
    out = {}
    for t in TARGETS:
        if t.numerator in entries and t.denominator in entries:
            value = entries[t.numerator][t.measure] / entries[t.denominator][t.measure]
            out[t.name] = {"value": value, "max": t.limit, "met": value <= t.limit}
    if "concept" in entries:
        for name, entry in report["samplers"].items():
            if name != "concept":
                value = entry["s_per_row"] / entries["concept"]["s_per_row"]
                out[f"{name} / concept (s_per_row)"] = {
                    "value": value, "min": 1 - S_PER_ROW_TOLERANCE, "max": 1 + S_PER_ROW_TOLERANCE,
                    "met": abs(value - 1) <= S_PER_ROW_TOLERANCE}
    return out


def machine(device: str) -> dict:
    import diffusers
    import torch

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def load_average() -> float | None:
    """The 1-minute load average: on a shared machine, other work slows every method, so
    the report says how busy the machine was (this run itself adds about its threads)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def format_report(report: dict) -> str:
    lines = [f"model: {report['model']}",
             f"{report['device']} {report['dtype']}, {report['size']}x{report['size']}, {report['steps']} steps, "
             f"median of {report['repeats']} after {report['warmup']} warm-up round(s)",
             "", f"{'method':<11} {'s/image':>8} {'rows':>5} {'s/row':>7} {'peak MB':>8}"]
    for name, e in {DIFFUSERS: report[DIFFUSERS], **report["samplers"]}.items():
        lines.append(f"{name:<11} {e['s']:>8.3f} {e['rows']:>5} {e['s_per_row']:>7.4f} {e['peak_mb']:>8.0f}")
    lines += ["", f"{'ratio of medians':<34} {'value':>6}  target"]
    for name, r in report["ratios"].items():
        target = f"{r['min']:.2f}..{r['max']:.2f}" if "min" in r else f"<= {r['max']:.2f}"
        lines.append(f"{name:<34} {r['value']:>6.3f}  {target:<11} {'met' if r['met'] else 'MISSED'}")
    m = report["machine"]
    lines += ["", f"machine: {m.get('gpu', m['cpu'])}; {m['cores']} CPU cores ({m['torch_threads']} torch threads); "
              f"torch {m['torch']}, diffusers {m['diffusers']}"]
    if m.get("load_start") is not None:
        lines.append(f"load average (1 min): {m['load_start']:.2f} at the start, {m['load_end']:.2f} at the end")
    return "\n".join(lines)
