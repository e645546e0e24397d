"""`personalize bench`: time diffusers' own pipeline and every sampler side by side, then
every training method (seconds per step, memory, file size; `--no-training` skips it)."""

from __future__ import annotations

import json
import os
import sys

from personalize.errors import UserError
from personalize.evaluation.bench import ARCH_CHOICES, format_report, run_bench
from personalize.models.architectures import ARCHITECTURES, build_pipeline
from personalize.models.loading import check_device, default_model, load_pipeline
from personalize.sampling.backbones import backbone
from personalize.sampling.runtime import parameter_count, resolve_runtime
from personalize.sampling.samplers import SAMPLERS
from personalize.training.recipes import METHODS, recipe
from personalize.world.paths import is_world


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None,
                        help="a diffusers pipeline folder or hub id to time (default: the default model, docs/interfaces.md)")
    parser.add_argument("--arch", default=None, choices=ARCH_CHOICES,
                        help="random-weight architecture instead of a model: mid (CPU-sized), sd2 (SD 2 base; "
                             "for GPUs), demo (tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds; the median counts")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--samplers", default=None, help="comma-separated subset (default: all eight)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--training-methods", default=None,
                        help="comma-separated training methods to time (default: all four)")
    parser.add_argument("--training-steps", type=int, default=3,
                        help="optimizer steps per training method; the first is warm-up (default 3)")
    parser.add_argument("--no-training", action="store_true", help="skip the training section")
    parser.add_argument("--throughput-images", type=int, default=8,
                        help="on a world (a model folder with world.json): images per prompt of the throughput section, "
                             "4 prompts; 0 skips it (default 8)")
    parser.add_argument("--no-onnx", action="store_true",
                        help="skip the rows with the denoiser in ONNX Runtime (timed by default on a CPU in float32 "
                             "when onnxruntime is installed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def command(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: folders, the local cache or random weights
    names = check_args(args)
    training = check_training_args(args)
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    pipe, model = load(args)
    report = run_bench(pipe, model=model, names=names, device=args.device, dtype=args.dtype, steps=args.steps,
                       size=args.size, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                       progress=progress_line, training_methods=training, training_steps=args.training_steps,
                       throughput_images=args.throughput_images if is_world(model) else 0,
                       onnx=not args.no_onnx and timed_in_onnx(pipe, args.device, args.dtype))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def timed_in_onnx(pipe, device: str, dtype: str) -> bool:
    """Whether `auto` would run this pipeline's denoiser in ONNX Runtime: then the bench
    times it both ways."""
    model = backbone(pipe)
    return resolve_runtime("auto", device, dtype, model.family, parameter_count(model.denoiser)) == "onnx"


def check_args(args) -> list[str]:
    """Check every option that can be checked before a model is built; returns the
    sampler names to time."""

    if args.model is not None and args.arch is not None:
        raise UserError("bench: give --model (a pipeline to time) or --arch (a random-weight architecture), not both")
    for name, value, low in (("--steps", args.steps, 1), ("--repeats", args.repeats, 1),
                             ("--warmup", args.warmup, 0), ("--seed", args.seed, 0),
                             ("--throughput-images", args.throughput_images, 0),
                             ("--threads", 1 if args.threads is None else args.threads, 1)):
        if value < low:
            raise UserError(f"{name}: {value} must be at least {low}")
    if args.size is not None and (args.size <= 0 or args.size % 8):
        raise UserError(f"--size: {args.size} must be a positive multiple of 8")
    if args.samplers is None:
        return list(SAMPLERS)
    names = [n.strip() for n in args.samplers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown or not names:
        raise UserError(f"--samplers: {unknown[0] if unknown else args.samplers!r} is not a sampler; "
                        f"accepted: {', '.join(SAMPLERS)}")
    return list(dict.fromkeys(names))


def check_training_args(args) -> list[str]:
    """The training methods to time (empty with --no-training)."""

    if args.no_training:
        return []
    if args.training_steps < 2:
        raise UserError(f"--training-steps: {args.training_steps} must be at least 2 (the first step is warm-up)")
    if args.training_methods is None:
        return list(METHODS)
    names = [n.strip() for n in args.training_methods.split(",") if n.strip()]
    if not names:
        raise UserError(f"--training-methods: {args.training_methods!r} names no method; accepted: "
                        f"{', '.join(METHODS)}")
    try:
        return list(dict.fromkeys(recipe(n).method for n in names))
    except UserError as e:
        raise UserError(str(e).replace("--method", "--training-methods")) from None


def load(args):
    """The pipeline to time and how the report names it."""

    model = args.model
    if model is None and args.arch is None:
        model, why = default_model(args.device)   # as every verb does when no model is named
        progress_line(f"model: {model} ({why})")
    if model is not None:
        # DDIM for every method: the study samples with it, and ProFusion runs on nothing else.
        return load_pipeline(model, device=args.device, dtype=args.dtype, scheduler="ddim"), str(model)

    device, dtype = check_device(args.device, args.dtype)
    arch = ARCHITECTURES[args.arch]
    return build_pipeline(arch, device=device, dtype=dtype), f"arch:{arch.name} ({arch.description})"


def progress_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
