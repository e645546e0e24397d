"""Loading base pipelines from a local folder or a hub id, once per process."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from personalize.errors import UserError
from personalize.models.demo import ensure_demo_model
from personalize.sampling.backbones import SUPPORTED, backbone

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda", "mps")
SCHEDULERS = ("model", "ddim")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

STUDY_MODEL = "stabilityai/stable-diffusion-2-base"  # the study's base model

_cache: dict[tuple, object] = {}


def study_model_available(timeout: float = 5.0) -> bool:
    """Whether the study's base model can be had here: in the local hub cache, or from
    the hub (a short check; offline machines say no at once)."""

    try:
        from huggingface_hub import snapshot_download
        snapshot_download(STUDY_MODEL, local_files_only=True, allow_patterns=["model_index.json"])
        return True
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import HfApi
        HfApi().model_info(STUDY_MODEL, timeout=timeout)
        return True
    except Exception:
        return False


def shipped_world_folder() -> Path | None:
    """The trained world model shipped in `assets/world/`, if this checkout has it."""
    try:
        from personalize.world.paths import shipped_world
    except ImportError:  # a checkout without the world package
        return None
    return shipped_world()


def default_model(device: str | None = None) -> tuple[str, str]:
    """The base model a run uses when none is named, and why: the study's SD 2 base when a
    CUDA GPU is present and the model can be had; else the small trained world model
    shipped in `assets/world/` when it is there; else the offline demo model (random
    weights, written on first use). With `device`, a run that will not use CUDA never
    gets SD 2 (hours per image on a CPU)."""
    cuda_run = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda_run and study_model_available():
        return STUDY_MODEL, "the study's base model (a CUDA GPU is present and its weights can be had)"
    world = shipped_world_folder()
    if world is not None:
        why = ("no CUDA GPU here" if not torch.cuda.is_available() else f"a run on {device}" if not cuda_run
               else "the study's base model cannot be had here")
        return str(world), f"the shipped world model ({why})"

    return str(ensure_demo_model()), "the offline demo model (no GPU with the study's model, and no shipped world model)"


def model_size(model: str) -> int | None:
    """The image side a pipeline folder was made for, `sample_size * vae_scale_factor`,
    read from its configs without loading it; None for a hub id."""
    folder = Path(model)
    vae = folder / "vae" / "config.json"
    factor = 8
    if vae.is_file():
        factor = 2 ** (len(json.loads(vae.read_text()).get("block_out_channels", [0] * 4)) - 1)
    for part in ("unet", "transformer"):
        config = folder / part / "config.json"
        if config.is_file():
            return int(json.loads(config.read_text()).get("sample_size", 64)) * factor
    return None


def check_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device not in DEVICES:
        raise UserError(f"--device: {device!r} is not one of {' | '.join(DEVICES)}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {' | '.join(DTYPES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda was asked for, but no CUDA device is available here")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device: mps was asked for, but no MPS device is available here")
    if device == "cpu" and dtype == "float16":
        raise UserError("--dtype: float16 is not supported on the CPU; use float32 or bfloat16")
    return torch.device(device), DTYPES[dtype]


def check_model(model: str) -> str:
    """Refuse a model that is neither a diffusers pipeline folder nor a hub id, before any
    loading starts."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model: {model} is a file; give a diffusers pipeline folder or a hub id")
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(f"--model: {model} is not a diffusers pipeline folder (no model_index.json)")
        try:
            json.loads(index.read_text())
        except ValueError as e:
            raise UserError(f"--model: {index} is not valid JSON ({e})") from None
        return str(path)
    if not HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise UserError(f"--model: the folder {model} does not exist (and it is not a hub id like org/name)")
    return model


def load_pipeline(model: str, *, device: str = "cpu", dtype: str = "float32", scheduler: str = "model"):
    """The pipeline at `model` (SD 1.x/2.x, SD-XL or PixArt-alpha; see `backbones.py`),
    cached per (model, device, dtype, scheduler): a process loads each model once."""

    model = check_model(model)
    torch_device, torch_dtype = check_device(device, dtype)
    if scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler: {scheduler!r} is not one of {' | '.join(SCHEDULERS)}")
    key = (model, device, dtype, scheduler)
    if key in _cache:
        return _cache[key]
    try:
        index = DiffusionPipeline.load_config(model)
        extra = {"safety_checker": None} if "safety_checker" in index else {}  # SD 1.x/2.x folders only
        pipe = DiffusionPipeline.from_pretrained(model, dtype=torch_dtype, **extra)
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model: could not load {model}: {first}") from None
    try:
        backbone(pipe)
    except UserError:
        raise UserError(f"--model: {model} is a {type(pipe).__name__}; supported pipelines: {SUPPORTED}") from None
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(torch_device)
    _cache[key] = pipe
    return pipe


def release_pipelines(*, keep: str | None = None) -> int:
    """Drop every cached pipeline whose model is not `keep`; returns how many were dropped."""
    stale = [key for key in _cache if key[0] != keep]
    for key in stale:
        del _cache[key]
    return len(stale)


def read_concept_json(folder: str | Path) -> dict | None:
    """The `concept.json` of a model folder (phrase, superclass, references), if any,
    with reference paths made absolute."""
    path = Path(folder) / "concept.json"
    if not path.is_file():
        return None
    try:
        concept = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    for key in ("phrase", "superclass"):
        if not isinstance(concept.get(key), str) or not concept[key].strip():
            raise UserError(f"{path}: {key!r} must be a non-empty string")
    concept["references"] = [str((path.parent / p).resolve()) for p in concept.get("references", [])]
    return concept


def concept_meta(model: str | Path, weights: str | Path | None = None) -> dict:
    """What a run knows of its concept (phrase, superclass, references): the `concept.json`
    beside the concept's weights where they are a folder that has one (a trained concept
    carries its own), else the model folder's, else nothing."""
    for folder in (weights, model):
        if folder is not None and Path(folder).is_dir():
            meta = read_concept_json(folder)
            if meta is not None:
                return meta
    return {}
