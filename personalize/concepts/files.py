"""Concept files: the formats `--concept` accepts, which one a path holds
(`detect_format`), and reading weights without unpickling anything but tensors."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from personalize.errors import UserError

FORMATS = ("dreambooth", "lora", "textual_inversion", "custom_diffusion", "svdiff")
ACCEPTED = ("a DreamBooth pipeline folder (model_index.json) or a folder with fine-tuned unet/ and/or "
            "text_encoder/; a LoRA file (diffusers or kohya keys); a textual-inversion embedding "
            "(.safetensors, .bin or .pt); a Custom Diffusion folder (pytorch_custom_diffusion_weights.* "
            "plus <token>.bin); SVDiff spectral shifts (spectral_shifts.safetensors / "
            "spectral_shifts_te.safetensors, or unet.bin / text_encoder.bin)")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
SVDIFF_FILES = {"spectral_shifts.safetensors": "unet", "spectral_shifts_te.safetensors": "text_encoder",
                "unet.bin": "unet", "text_encoder.bin": "text_encoder"}
CUSTOM_DIFFUSION_FILES = ("pytorch_custom_diffusion_weights.safetensors", "pytorch_custom_diffusion_weights.bin")
LORA_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
TI_FILES = ("learned_embeds.safetensors", "learned_embeds.bin")
# Files that name their format, in the order a folder is searched.
NAMED_FILES = (("svdiff", tuple(SVDIFF_FILES)), ("custom_diffusion", CUSTOM_DIFFUSION_FILES),
               ("lora", LORA_FILES), ("textual_inversion", TI_FILES))
SCALABLE = ("lora", "svdiff")
LORA_ADAPTER = "personalize_concept"

def fail(path, message: str) -> UserError:
    return UserError(f"--concept: {path}: {message}")


# -- detection ------------------------------------------------------------------------

def detect_format(path) -> str:
    """The format of the concept at `path`: one of `FORMATS`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--concept: {path} does not exist")
    return _detect_folder(path) if path.is_dir() else _detect_file(path)


def _detect_folder(folder: Path) -> str:
    # Named files first: a textual-inversion run saved "as full pipeline" also has model_index.json.
    for fmt, names in NAMED_FILES:
        if any((folder / name).is_file() for name in names):
            return fmt
    if (folder / "model_index.json").is_file() or module_folders(folder):
        return "dreambooth"
    files = weight_files(folder)
    if len(files) == 1:
        return _detect_file(files[0])
    found = f"{len(files)} weight files" if files else "no weight files"
    raise fail(folder, f"unknown concept layout ({found}); accepted: {ACCEPTED}")


def _detect_file(path: Path) -> str:
    for fmt, names in NAMED_FILES:
        if path.name in names:
            return fmt
    fmt = _classify(peek_weights(path))
    if fmt is None:
        raise fail(path, f"unknown concept layout; accepted: {ACCEPTED}")
    return fmt


def _classify(weights) -> str | None:
    """The format a file's keys show, or None."""
    if isinstance(weights, torch.Tensor):
        return "textual_inversion"  # a bare embedding tensor
    if not isinstance(weights, dict) or not all(isinstance(k, str) for k in weights):
        return None
    keys = list(weights)
    if any("custom_diffusion" in k for k in keys):
        return "custom_diffusion"
    if any(_is_lora_key(k) for k in keys):
        return "lora"
    if keys and all(k.endswith(".delta") for k in keys):
        return "svdiff"
    if "string_to_param" in weights or (len(keys) == 1 and is_embedding(weights[keys[0]])):
        return "textual_inversion"
    return None


def _is_lora_key(key: str) -> bool:
    return key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or any(
        s in key for s in (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.",
                           ".lora_linear_layer.", ".lora_down.", ".lora_up."))


def is_embedding(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim in (1, 2)


def module_folders(folder: Path) -> list[str]:
    return [name for name in ("unet", "text_encoder") if (folder / name / "config.json").is_file()]


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


# -- reading --------------------------------------------------------------------------

def read_weights(path: Path) -> tuple[object, dict]:
    """(contents, safetensors metadata) of a weight file, without unpickling anything but
    tensors and plain containers."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return load_file(str(path)), metadata
        except Exception as e:  # safetensors reports corruption with several error types
            raise fail(path, f"not a readable safetensors file ({first_line(e)})") from None
    if path.suffix in (".bin", ".pt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), {}
        except pickle.UnpicklingError as e:
            raise fail(path, "refused: it holds pickled objects other than tensors, and only tensors are "
                             f"loaded (torch.load weights_only=True): {first_line(e)}") from None
        except Exception as e:
            raise fail(path, f"not a readable PyTorch weights file ({first_line(e)})") from None
    raise fail(path, f"unsupported file type {path.suffix!r}; expected one of {', '.join(WEIGHT_SUFFIXES)}")


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def peek_weights(path: Path):
    """What `_classify` needs of a weight file (its keys, each value's dtype and shape)
    without reading the tensors' data: a large concept file is then read once, when it is
    loaded. Safetensors: the header only, values as meta tensors; PyTorch zip files:
    memory-mapped, so that untouched tensors are never read."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}
                return {k: torch.empty(v.get_shape(), device="meta",
                                       dtype=_SAFETENSORS_DTYPES.get(v.get_dtype(), torch.uint8))
                        for k, v in slices.items()}
        except Exception as e:  # safetensors reports corruption with several error types
            raise fail(path, f"not a readable safetensors file ({first_line(e)})") from None
    if path.suffix in (".bin", ".pt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            pass    # read_weights gives the refusal its message
        except RuntimeError:
            pass    # not a zip checkpoint (the legacy format cannot be memory-mapped): read it whole
    return read_weights(path)[0]


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A weight file that must be a flat {name: tensor} dict."""
    weights, metadata = read_weights(path)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise fail(path, "expected a flat {name: tensor} dictionary")
    return weights, metadata


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


