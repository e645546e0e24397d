"""The performance benchmark behind `personalize bench`.

In one process and on one set of components, diffusers' own `StableDiffusionPipeline`
(concept prompt, CFG) and then every sampler generate one image each; after warm-up
rounds, several measured rounds follow and the median counts. Methods run interleaved
(one of each per round), so a slower spell of a shared machine hits all of them alike.
Reported per method: seconds per image, denoiser batch rows, seconds per row and peak
memory (process RSS on the CPU, max allocated on CUDA), and the ratios of medians
against the targets in `TARGETS`. Then, unless skipped, every training method on the
same pipeline (`personalize.training.bench.training_bench`): seconds per optimizer step,
peak and added memory, the size of the files written, and each as a ratio of SVDiff's
(the study's method), with one step's time in denoiser rows of sampling. On a world, the
sweep's batched throughput against one image at a time (`reproduce.throughput`).
"""

from __future__ import annotations

import inspect
import os
import platform
import statistics
import time
from dataclasses import dataclass

import diffusers
import torch

from personalize.errors import UserError
from personalize.evaluation.memory import PeakMemory
from personalize.evaluation.reproduce import throughput
from personalize.models.demo import DEMO_CONCEPT
from personalize.prompts import prompt_pair
from personalize.sampling import engine
from personalize.sampling.backbones import default_size
from personalize.sampling.samplers import configure, plan, reaches_into_attention
from personalize.training.bench import training_bench
from personalize.training.loop import check_resolution
from personalize.training.recipes import METHODS

DIFFUSERS = "diffusers"           # the baseline's name in reports
TEMPLATE = "a photo of a {} on the beach"
S_PER_ROW_TOLERANCE = 0.10        # every sampler's seconds per row within 10% of concept's
ARCH_CHOICES = ("mid", "sd2", "demo")
TRAINING_REFERENCE = "svdiff"     # training costs are also given as ratios of this method's
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
    Target("mixed onnx", "mixed", 0.75),
)
ONNX = " onnx"  # suffix of the rows whose denoiser ran in ONNX Runtime (sampling/runtime.py)


# -- measuring ----------------------------------------------------------------------------

def run_bench(pipe, *, model: str, names: list[str], device: str = "cpu", dtype: str = "float32", steps: int = 10,
              size: int | None = None, repeats: int = 3, warmup: int = 1, seed: int = 0, progress=None,
              training_methods=None, training_steps: int = 3, throughput_images: int = 0,
              onnx: bool = False) -> dict:
    """Time diffusers' pipeline and the samplers `names` on `pipe` (with `onnx`, also each
    sampler that can, with its denoiser in ONNX Runtime: rows "<name> onnx"), then the training
    methods `training_methods` (None: every one; empty: none) for `training_steps` steps
    at the same size; with `throughput_images` (a world), the sweep's batched throughput
    against one image at a time on 4 prompts of that many images each (`throughput`);
    returns the report (the `--json` object)."""

    size = size or default_size(pipe)[0]
    train = training_methods is None or len(training_methods) > 0
    if train:
        check_training_size(pipe, size)   # before minutes of sampling, not after
    jobs, configs = make_jobs(pipe, names, steps=steps, size=size, seed=seed, onnx=onnx)
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
    onnx_rows = {name: results.pop(name) for name in list(results) if name.endswith(ONNX)}
    report = {"device": device, "model": model, "steps": steps, "size": size, "dtype": dtype,
              "repeats": repeats, "warmup": warmup, "seed": seed,
              "diffusers_concept_s": results[DIFFUSERS]["s"], DIFFUSERS: results.pop(DIFFUSERS),
              "samplers": results, "onnx": onnx_rows, "machine": dict(machine(device), load_start=load_start)}
    report["ratios"] = ratios(report)
    if throughput_images:
        if progress is not None:
            progress(f"throughput: 4 prompts x {throughput_images} images, three ways")
        report["throughput"] = throughput(pipe, images=throughput_images, steps=steps, size=size, onnx=onnx)
    if train:
        if progress is not None:
            progress(f"training: {training_steps} steps per method")
        report["training"] = run_training_bench(pipe, methods=training_methods, steps=training_steps,
                                                resolution=size, seed=seed,
                                                reference=report["samplers"].get("concept"))
    report["machine"]["load_end"] = load_average()
    return report


def check_training_size(pipe, size: int) -> None:
    try:
        check_resolution(pipe, size)
    except UserError as e:
        raise UserError(f"--size: {size} is not a training resolution of this model "
                        f"({str(e).split(': ', 1)[1]}); change --size or pass --no-training") from None


def run_training_bench(pipe, *, methods=None, steps: int = 3, resolution: int | None = None, seed: int = 0,
                       reference: dict | None = None) -> dict:
    """`training_bench` on `pipe` for `methods` (None: every method), one after another in
    this process, with `training_ratios`; `reference` is the concept sampler's entry of the
    same run (for a step's cost in denoiser rows)."""

    rows = training_bench(pipe, list(methods) if methods is not None else METHODS, steps, resolution=resolution,
                          seed=seed)
    return {"steps": steps, "resolution": resolution, "reference": TRAINING_REFERENCE,
            "methods": {row["method"]: row for row in rows}, "ratios": training_ratios(rows, reference)}


def training_ratios(rows: list[dict], concept: dict | None = None) -> dict:
    """{method: ratios} from the rows of `training_bench`: seconds per step, added memory
    and file size over the reference method's (`TRAINING_REFERENCE`, or the first method
    measured when it was not), and `step_rows`, one step's seconds over the concept
    sampler's seconds per denoiser row (with `concept`, its bench entry)."""
    measured = [r for r in rows if "error" not in r]
    if not measured:
        return {}
    ref = next((r for r in measured if r["method"] == TRAINING_REFERENCE), measured[0])

    def ratio(a, b):
        return a / b if b else None
    out = {}
    for r in measured:
        entry = {"reference": ref["method"], "s_per_step": r["seconds_per_step"] / ref["seconds_per_step"],
                 "added_memory": ratio(r["added_memory_mb"], ref["added_memory_mb"]),
                 "file": ratio(r["file_bytes"], ref["file_bytes"])}
        if concept is not None:
            entry["step_rows"] = r["seconds_per_step"] / concept["s_per_row"]
        out[r["method"]] = entry
    return out


@dataclass(frozen=True)
class Measurement:
    seconds: float
    rows: int
    peak_bytes: int


def make_jobs(pipe, names: list[str], *, steps: int, size: int, seed: int, onnx: bool = False) -> tuple[dict, dict]:
    """name -> a function that generates one image and returns the denoiser rows it used,
    and sampler name -> its config: the defaults (step counts scaled to `steps` by
    `configure`, so every stage keeps its share of the trajectory and of the cost). With
    `onnx`, "<name> onnx" for each sampler that does not reach into attention."""


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

    def sampler_job(config, runtime="torch"):
        def job() -> int:
            return engine.run(pipe, prompts, config, seed=seed, height=size, width=size,
                              concept_phrase=DEMO_CONCEPT["phrase"], runtime=runtime).rows
        return job

    configs = {name: configure(name, {}, steps) for name in names}
    jobs = {DIFFUSERS: diffusers_job, **{name: sampler_job(config) for name, config in configs.items()}}
    if onnx:
        jobs.update({name + ONNX: sampler_job(config, "onnx") for name, config in configs.items()
                     if not reaches_into_attention(plan(config))})
    return jobs, configs


def measure(job, device: str) -> Measurement:
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
    entries = dict(report["samplers"], **report.get("onnx", {}), **{DIFFUSERS: report[DIFFUSERS]})
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
             "", f"{'method':<15} {'s/image':>8} {'rows':>5} {'s/row':>7} {'peak MB':>8}"]
    for name, e in {DIFFUSERS: report[DIFFUSERS], **report["samplers"], **report.get("onnx", {})}.items():
        lines.append(f"{name:<15} {e['s']:>8.3f} {e['rows']:>5} {e['s_per_row']:>7.4f} {e['peak_mb']:>8.0f}")
    lines += ["", f"{'ratio of medians':<34} {'value':>6}  target"]
    for name, r in report["ratios"].items():
        target = f"{r['min']:.2f}..{r['max']:.2f}" if "min" in r else f"<= {r['max']:.2f}"
        lines.append(f"{name:<34} {r['value']:>6.3f}  {target:<11} {'met' if r['met'] else 'MISSED'}")
    if "throughput" in report:
        lines += ["", *format_throughput(report["throughput"])]
    if "training" in report:
        lines += ["", *format_training(report["training"])]
    m = report["machine"]
    lines += ["", f"machine: {m.get('gpu', m['cpu'])}; {m['cores']} CPU cores ({m['torch_threads']} torch threads); "
              f"torch {m['torch']}, diffusers {m['diffusers']}"]
    if m.get("load_start") is not None:
        lines.append(f"load average (1 min): {m['load_start']:.2f} at the start, {m['load_end']:.2f} at the end")
    return "\n".join(lines)


def format_throughput(t: dict) -> list[str]:
    """The throughput section: images per second three ways, then the sweep's ratios."""
    lines = [f"throughput: concept sampling, {t['images']} images ({t['prompts']} prompts), {t['steps']} steps, "
             f"{t['size']}x{t['size']}",
             f"{'way':<34} {'images/s':>9} {'calls':>6} {'rows':>6}"]
    labels = {"sweep": "sweep (batched)", "generate": "one generate per image",
              "diffusers": "diffusers' pipeline per prompt", "sweep onnx": "sweep, denoiser in ONNX Runtime"}
    for name, w in t["ways"].items():
        lines.append(f"{labels[name]:<34} {w['images_per_s']:>9.2f} {w['denoiser_calls']:>6} {w['denoiser_rows']:>6}")
    met = t["sweep_vs_generate"] >= t["min_sweep_vs_generate"]
    lines += [f"{'sweep / generate (images per s)':<34} {t['sweep_vs_generate']:>9.2f}  >= "
              f"{t['min_sweep_vs_generate']:.2f} {'met' if met else 'MISSED'}",
              f"{'sweep / diffusers (images per s)':<34} {t['sweep_vs_diffusers']:>9.2f}"]
    if "sweep_onnx_vs_sweep" in t:
        lines.append(f"{'sweep onnx / sweep (images per s)':<34} {t['sweep_onnx_vs_sweep']:>9.2f}")
    return lines


def format_training(training: dict) -> list[str]:
    """The training section of the table: one line per method, its figures then its ratios."""
    def fmt(value, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    ran = [row for row in training["methods"].values() if "error" not in row]
    reference = training["ratios"][ran[0]["method"]]["reference"] if ran else training["reference"]
    lines = [f"training: {training['steps']} steps per method at {training['resolution']}x{training['resolution']} "
             f"(first step warm-up); x = ratio of {reference}'s, rows = one step in concept denoiser rows",
             f"{'method':<18} {'s/step':>7} {'peak MB':>8} {'added MB':>9} {'file':>8} "
             f"{'x s/step':>9} {'x added':>8} {'x file':>8} {'rows':>6}"]
    for name, row in training["methods"].items():
        if "error" in row:
            lines.append(f"{name:<18} {row['error']}")
            continue
        r = training["ratios"][name]
        lines.append(f"{name:<18} {row['seconds_per_step']:>7.3f} {row['peak_memory_mb']:>8.0f} "
                     f"{row['added_memory_mb']:>9.1f} {file_size(row['file_bytes']):>8} {r['s_per_step']:>9.2f} "
                     f"{fmt(r['added_memory'], 8, 2)} {fmt(r['file'], 8, 2)} {fmt(r.get('step_rows'), 6, 1)}")
    if ran:
        lines.append(f"memory: {ran[0]['memory_kind']}")
    return lines


def file_size(n: int) -> str:
    """Bytes in the largest unit that keeps the number at least 1 (B, KB, MB, GB)."""
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GB"
