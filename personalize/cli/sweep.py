"""`personalize sweep CONFIG --out DIR`: a resumable hyperparameter sweep with metrics."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from personalize.evaluation.sweep import RESULTS, dry_run, run_sweep
from personalize.evaluation.sweep_config import load_config


def add_arguments(parser) -> None:
    parser.add_argument("config", help="the sweep YAML file")
    parser.add_argument("--out", required=True, help="the sweep folder (results.csv, images/); run again to resume")
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | mps (default: the config's, else cuda when available)")
    parser.add_argument("--dtype", default=None,
                        help="float32 | float16 | bfloat16 (default: the config's, else float32)")
    parser.add_argument("--dry-run", action="store_true", help="check the config, count the work, generate nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def command(args) -> int:
    config = load_config(args.config, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    if args.dry_run:
        print(dry_run(config, out))
        return 0
    try:
        summary = run_sweep(config, out, progress=not args.no_progress)
    finally:
        _end_processes()
    if summary.rows:  # the main process, after the merge
        note = "; metrics from RANDOM-WEIGHT models: not the study's numbers" if summary.random_weights else ""
        print(f"{summary.rows} rows in {out / RESULTS} ({summary.rows - summary.done_before} new, "
              f"{summary.seconds:.1f} s){note}", file=sys.stderr)
    return 0


def _end_processes() -> None:
    """Leave the process group of `accelerate launch` cleanly (torch warns at exit otherwise)."""

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
