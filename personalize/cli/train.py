"""`personalize train`: turn a folder of 1 to 1000 photos into a concept folder that
`--concept` autodetects (SVDiff, DreamBooth, LoRA or textual inversion).

Every default is printed at the start (and recorded in the folder's concept.json); a
progress bar shows the loss, steps per second and the time left. Ctrl-C saves a
checkpoint and writes the concept from the weights so far; `--resume` continues from the
last checkpoint to the same weights an uninterrupted run gives.
"""

from __future__ import annotations

import argparse
import signal
import threading

from tqdm.auto import tqdm

from personalize.errors import UserError
from personalize.models.loading import check_device, load_pipeline
from personalize.training.data import read_image_folder
from personalize.training.loop import check_out, check_resolution, train_concept
from personalize.training.recipes import METHODS
from personalize.training.recipes import recipe as default_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="base pipeline folder or hub id (default: the offline demo model)")
    parser.add_argument("--images", required=True, help="folder of the concept's photos (PNG/JPEG)")
    parser.add_argument("--phrase", required=True, help='the concept phrase, e.g. "sks dog" (textual inversion: one '
                        "new token such as <sks>)")
    parser.add_argument("--superclass", required=True, help="the concept's class noun, e.g. dog")
    parser.add_argument("--method", default="svdiff", help=" | ".join(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the method's recipe)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's recipe)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--text-encoder", action=argparse.BooleanOptionalAction, default=None,
                        help="also train the text encoder (default: the method's recipe)")
    parser.add_argument("--prior-preservation", action="store_true",
                        help='add a prior-preservation loss on "a photo of a SUPERCLASS" images of the base model')
    parser.add_argument("--class-images", type=int, default=None, help="class images with --prior-preservation (100)")
    parser.add_argument("--prior-weight", type=float, default=1.0)
    parser.add_argument("--class-image-steps", type=int, default=25, help="DDIM steps per class image")
    parser.add_argument("--resolution", type=int, default=None, help="training image side (default: the model's native)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32",
                        help="float32 | float16 | bfloat16: the base model's dtype; trained tensors stay float32 "
                             "and the forward pass runs in mixed precision")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade time for memory (GPU)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (recipe's)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous training run in --out")
    parser.add_argument("--out", required=True, help="the concept folder to write")


def print_settings(rec, args, resolution: int, model: str) -> None:
    """Every setting of the run, defaults marked."""

    base = default_recipe(rec.method)
    print(f"training a {rec.method} concept ({rec.source})")
    rows = [("model", model), ("phrase", args.phrase), ("superclass", args.superclass),
            ("resolution", resolution), ("seed", args.seed), ("device", args.device), ("dtype", args.dtype)]
    for key, value in rec.as_dict().items():
        if key in ("method", "source"):
            continue
        if key == "prompts" and len(value) > 3:
            value = f"{len(value)} templates, e.g. {value[0]!r}"
        rows.append((key, f"{value}{'' if getattr(base, key) == getattr(rec, key) else '  (given)'}"))
    rows += [("prior_preservation", args.prior_preservation), ("gradient_checkpointing", args.gradient_checkpointing),
             ("out", args.out)]
    if args.prior_preservation:
        rows += [("class_images", args.class_images), ("prior_weight", args.prior_weight),
                 ("class_image_steps", args.class_image_steps)]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def command(args) -> int:
    # 1. everything that needs no model
    rec = default_recipe(args.method)
    for name in ("steps", "batch_size", "checkpoint_every", "class_images"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')}: {value} must be > 0")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr: {args.lr} must be > 0")
    for name in ("phrase", "superclass"):
        if not getattr(args, name).strip():
            raise UserError(f"--{name}: must not be empty")
    check_device(args.device, args.dtype)
    images, _ = read_image_folder(args.images)
    check_out(args.out, overwrite=args.overwrite, resume=args.resume)
    class_images = (args.class_images or 100) if args.prior_preservation else 0
    try:
        rec = rec.replace(steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                          train_text_encoder=args.text_encoder, checkpoint_every=args.checkpoint_every)
    except ValueError as e:
        raise UserError(f"--{rec.method}: {e}") from None

    # 2. the model (train_concept checks the rest before writing anything)
    if args.model is None:
        from personalize.models.demo import ensure_demo_model
        model = str(ensure_demo_model())
    else:
        model = args.model
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
    resolution = check_resolution(pipe, args.resolution)
    args.class_images = class_images
    print_settings(rec, args, resolution, model)

    # 3. train, with a progress bar; Ctrl-C stops at the end of the step

    stop = threading.Event()
    bar = None

    def progress(info):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=info["steps"], initial=info["step"] - 1, unit="step", dynamic_ncols=True)
        bar.set_postfix(loss=f"{info['loss']:.4f}", refresh=False)
        bar.update(1)

    def interrupt(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\nstopping: saving a checkpoint and the concept so far (Ctrl-C again to abort)")

    previous = signal.signal(signal.SIGINT, interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        summary = train_concept(
            pipe, images, phrase=args.phrase, superclass=args.superclass, method=rec.method, out=args.out,
            steps=rec.steps, lr=rec.lr, batch_size=rec.batch_size, train_text_encoder=rec.train_text_encoder,
            prior_preservation=args.prior_preservation, class_images=class_images, prior_weight=args.prior_weight,
            class_image_steps=args.class_image_steps, resolution=resolution, seed=args.seed,
            checkpoint_every=rec.checkpoint_every, resume=args.resume, overwrite=args.overwrite,
            progress=progress, stop=stop, gradient_checkpointing=args.gradient_checkpointing, base_model=model)
    finally:
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    state = "stopped after" if summary["stopped"] else "trained"
    print(f"{state} {summary['steps']} steps in {summary['seconds']:.1f} s; probe loss "
          f"{summary['probe_loss_start']:.4f} -> {summary['probe_loss_end']:.4f}; concept written to {args.out}")
    return 0
