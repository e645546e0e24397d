"""Run cards and the files a run writes: images, run.json, latents, per-step files."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from personalize import __version__
from personalize.errors import UserError
from personalize.runs.preview import latents_to_rgb, map_to_image


def versions() -> dict:
    out = {}
    for name in ("personalize", "torch", "diffusers", "transformers", "onnxruntime"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["personalize"] = __version__
    return out


def run_card(*, config, prompts, negative_prompt, concept_phrase, superclass, seed, num_images,
             height, width, model, concept, scheduler, device, dtype, result) -> dict:
    return {
        "sampler": config.name,
        "params": dict(config.params),
        "prompt_template": prompts.template,
        "prompts": {"concept": prompts.concept, "superclass": prompts.superclass, "negative": negative_prompt},
        "concept_phrase": concept_phrase,
        "superclass": superclass,
        "seed": seed,
        "steps": config.steps,
        "num_images": num_images,
        "height": height,
        "width": width,
        "model": model,
        "concept": concept,
        "scheduler": scheduler,
        "device": device,
        "dtype": dtype,
        "runtime": result.runtime,
        "versions": versions(),
        "denoiser_rows": result.rows,
        "denoiser_rows_per_step": result.step_rows,
        "concept_token_index": result.token_index,
        "seconds": round(result.seconds, 4),
    }


def plain(value):
    """`value` with every non-finite float (NaN, inf) as None, so that it is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out: {out} is not empty; choose a new folder or pass --overwrite")
    return out


class StepRecorder:
    """A step callback that keeps what `--save-steps` writes: a preview per step and,
    for masked sampling, the attention map and mask."""

    def __init__(self):
        self.previews, self.maps, self.masks = [], [], []

    def __call__(self, info: dict) -> None:
        self.previews.append(latents_to_rgb(info["latents"]))
        self.maps.append(None if info["attention"] is None else info["attention"].float().cpu().numpy())
        self.masks.append(None if info["mask"] is None else info["mask"][:, 0].cpu().numpy())


def write_run(out: str | Path, card: dict, images: list, *, latents=None,
              steps: StepRecorder | None = None, overwrite: bool = False) -> dict:
    """Write a finished run into `out` all at once (a temporary folder moved into place),
    so a failure leaves nothing half-written; `latents`, if given, go to latents.npy.
    Returns the card with the file names."""
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        card = dict(card)
        card["images"] = []
        for k, image in enumerate(images):
            name = f"image_{k:03d}.png"
            image.save(tmp / name)
            card["images"].append(name)
        if latents is not None:
            np.save(tmp / "latents.npy", latents.float().cpu().numpy())
            card["latents"] = "latents.npy"
        if steps is not None:
            card["steps_dir"] = _write_steps(tmp / "steps", steps)
        (tmp / "run.json").write_text(json.dumps(plain(card), indent=2, allow_nan=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return card


def _write_steps(folder: Path, steps: StepRecorder) -> str:
    folder.mkdir()
    for i, previews in enumerate(steps.previews):
        for k, image in enumerate(previews):
            image.save(folder / f"step_{i:03d}_image_{k:03d}.png")
        if steps.maps[i] is not None:
            np.save(folder / f"step_{i:03d}_attention.npy", steps.maps[i])
            np.save(folder / f"step_{i:03d}_mask.npy", steps.masks[i])
            for k in range(len(steps.maps[i])):
                map_to_image(steps.maps[i][k]).save(folder / f"step_{i:03d}_attention_{k:03d}.png")
                map_to_image(steps.masks[i][k]).save(folder / f"step_{i:03d}_mask_{k:03d}.png")
    return folder.name

