"""Fine-tuned concepts (`--concept PATH`) on an existing Stable Diffusion pipeline.

`detect_format` names a concept's format from its files; `apply_concept` loads it into
the pipeline in place and returns a handle whose `remove()` restores the base model
exactly, so the app can swap concepts without reloading the base model.

Every loader first reads all of a concept's tensors and checks its keys and shapes
against the pipeline, and only then changes anything: a bad file leaves the base model
as it was. Nothing beyond plain tensors is unpickled: files are safetensors, or
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

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

# The concept applied to each pipeline: remove() of stacked concepts could not restore exactly.
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

Undo = Callable[[], None]
Step = Callable[[], Undo]  # changes the pipeline and returns how to change it back


@dataclass(eq=False)
class AppliedConcept:
    """A concept loaded into a pipeline. `token` is the prompt token that stands for the
    concept (textual inversion, Custom Diffusion), else None."""
    format: str
    path: str
    token: str | None
    _pipe: object = field(repr=False)
    _undo: list[Undo] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Restore the base model bitwise; calling it again does nothing. A step is
        dropped only once it has run, so a failed removal can be retried."""
        while self._undo:
            self._undo[-1]()
            self._undo.pop()
        if _ACTIVE.get(self._pipe) is self:
            del _ACTIVE[self._pipe]


@dataclass
class _Plan:
    """A checked concept: the steps that apply it, none run yet."""
    steps: list[Step]
    token: str | None = None


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
    if (folder / "model_index.json").is_file() or _module_folders(folder):
        return "dreambooth"
    files = _weight_files(folder)
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
    if "string_to_param" in weights or (len(keys) == 1 and _is_embedding(weights[keys[0]])):
        return "textual_inversion"
    return None


def _is_lora_key(key: str) -> bool:
    return key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) or any(
        s in key for s in (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.",
                           ".lora_linear_layer.", ".lora_down.", ".lora_up."))


def _is_embedding(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim in (1, 2)


def _module_folders(folder: Path) -> list[str]:
    return [name for name in ("unet", "text_encoder") if (folder / name / "config.json").is_file()]


def _weight_files(folder: Path) -> list[Path]:
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
            raise fail(path, f"not a readable safetensors file ({_first_line(e)})") from None
    if path.suffix in (".bin", ".pt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), {}
        except pickle.UnpicklingError as e:
            raise fail(path, "refused: it holds pickled objects other than tensors, and only tensors are "
                             f"loaded (torch.load weights_only=True): {_first_line(e)}") from None
        except Exception as e:
            raise fail(path, f"not a readable PyTorch weights file ({_first_line(e)})") from None
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
            raise fail(path, f"not a readable safetensors file ({_first_line(e)})") from None
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


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# -- applying -------------------------------------------------------------------------

def apply_concept(pipe, path, *, phrase: str | None = None, scale: float = 1.0) -> AppliedConcept:
    """Load the concept at `path` into `pipe` in place.

    `phrase` is the concept phrase: for textual inversion it becomes the new token (by
    default the file's own token); for Custom Diffusion it must contain the modifier
    token(s). `scale` weighs a LoRA or SVDiff concept (1 = as trained).
    """
    path = Path(path).expanduser()
    if not hasattr(pipe, "unet") or not hasattr(pipe, "text_encoder") or getattr(pipe, "text_encoder_2", None):
        raise UserError(f"--concept: concepts load onto Stable Diffusion 1.x/2.x pipelines; "
                        f"this model is a {type(pipe).__name__}")
    if _ACTIVE.get(pipe) is not None:
        raise UserError(f"--concept: {_ACTIVE[pipe].path} is still applied to this model; remove it first")
    fmt = detect_format(path)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise UserError(f"--concept-scale: {scale!r} must be a finite number")
    if scale != 1.0 and fmt not in SCALABLE:
        raise UserError(f"--concept-scale: {fmt} concepts have no scale (only {' and '.join(SCALABLE)}); use 1")
    plan = PREPARE[fmt](pipe, path, phrase=phrase, scale=float(scale))  # reads and checks; changes nothing
    concept = AppliedConcept(fmt, str(path), plan.token, pipe)
    try:
        for step in plan.steps:
            concept._undo.append(step())
    except BaseException:
        concept.remove()
        raise
    _ACTIVE[pipe] = concept
    return concept


def swap_step(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Step:
    """Replace the data of each (parameter or buffer, new value); undo puts the original
    tensors back, so the restored model is bitwise the base model."""
    def apply() -> Undo:
        saved = []

        def undo() -> None:
            with torch.no_grad():
                for target, original in reversed(saved):
                    target.data = original.to(target.device)

        try:
            with torch.no_grad():
                for target, new in pairs:
                    # Originals wait on the CPU so a concept on a GPU does not double its memory there.
                    saved.append((target, target.data.to("cpu")))
                    target.data = new.to(device=target.device, dtype=target.dtype)
        except BaseException:  # e.g. out of memory half-way: put back what was swapped
            undo()
            raise
        return undo
    return apply


def _check_shape(path, key: str, got: torch.Size, want: torch.Size) -> None:
    if tuple(got) != tuple(want):
        raise fail(path, f"{key} has shape {tuple(got)}, but this model expects {tuple(want)} "
                         "(a concept made for another base model?)")


def _checked_pairs(path, pairs: list[tuple[str, torch.Tensor, torch.Tensor]]) -> list[tuple]:
    """Shape-check (key, target, new) triples; a target listed twice would break undo."""
    seen = set()
    for key, target, new in pairs:
        _check_shape(path, key, new.shape, target.shape)
        if new.is_floating_point() != target.is_floating_point():
            raise fail(path, f"{key} holds {new.dtype} values where this model has {target.dtype}")
        if new.is_floating_point() and not torch.isfinite(new).all():
            raise fail(path, f"{key} holds NaN or infinite values")
        if id(target) in seen:
            raise fail(path, f"{key} changes a weight that another entry already changes")
        seen.add(id(target))
    return [(target, new) for _, target, new in pairs]


def _model_key(model, key: str) -> str:
    """transformers 5 flattened CLIPTextModel: older files still say `text_model.`."""
    if key.startswith("text_model.") and not hasattr(model, "text_model"):
        return key[len("text_model."):]
    return key


# -- DreamBooth -----------------------------------------------------------------------

DREAMBOOTH_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                      "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                      "diffusion_pytorch_model.bin", "pytorch_model.bin")
IGNORED_STATE = (".position_ids",)  # buffers older transformers saved and newer ones recompute


def _prepare_dreambooth(pipe, path: Path, **_) -> _Plan:
    """Fine-tuned `unet/` and/or `text_encoder/` weights replace the pipeline's (the VAE
    is not fine-tuned by DreamBooth and stays)."""
    names = _module_folders(path)
    if not names:
        raise fail(path, "a DreamBooth concept needs unet/ or text_encoder/ with config.json and weights")
    triples = []
    for name in names:
        file = _module_weights(path / name)
        weights, _ = read_tensors(file)
        triples += _state_triples(getattr(pipe, name), weights, file)
    return _Plan([swap_step(_checked_pairs(path, triples))])


def _module_weights(folder: Path) -> Path:
    for name in DREAMBOOTH_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    if any(folder.glob("*.index.json")):
        raise fail(folder, "sharded weights are not supported; save the module as one file")
    raise fail(folder, f"no weights file (expected one of {', '.join(DREAMBOOTH_WEIGHTS)})")


def _state_triples(model, weights: dict[str, torch.Tensor], file: Path) -> list:
    """(key, target, new) for a whole module's state dict: every weight must be there."""
    target = model.state_dict(keep_vars=True)
    renamed = {_model_key(model, k): v for k, v in weights.items() if not k.endswith(IGNORED_STATE)}
    unexpected = sorted(set(renamed) - set(target))
    missing = sorted(set(target) - set(renamed))
    if unexpected or missing:
        detail = "; ".join(f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for label, keys in (("unexpected keys", unexpected), ("missing keys", missing)) if keys)
        raise fail(file, f"does not match this model's {type(model).__name__} ({detail}); "
                         "a module made for another base model?")
    return [(key, target[key], value) for key, value in renamed.items()]


# -- SVDiff ---------------------------------------------------------------------------

def spectral_weight(weight: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """SVDiff's weight (Han et al. 2023, arXiv 2303.11305): U diag(relu(S + scale * delta)) V^T
    from the SVD of the base weight W, computed in the residual form
    W + U diag(relu(S + scale * delta) - S) V^T, which is the same matrix but leaves W
    bitwise unchanged where delta is zero. As in svdiff-pytorch, a conv kernel is a matrix
    (out, in * kh * kw), and a 1-D weight (norms) is one row (1, C)."""
    w = weight.detach().float()
    matrix = w.reshape(1, -1) if w.ndim == 1 else w.reshape(w.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return spectral_shift(weight, u, s, vh, delta.to(device=s.device, dtype=s.dtype), scale)


def spectral_shift(weight: torch.Tensor, u, s, vh, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """W + U diag(relu(S + scale * delta) - S) Vh, reshaped like W, given W's SVD."""
    shift = (u * (F.relu(s + scale * delta) - s)) @ vh
    return weight + shift.reshape(weight.shape).to(weight.dtype)


def spectral_size(weight: torch.Tensor) -> int:
    """The number of singular values (length of delta) of a weight."""
    return 1 if weight.ndim == 1 else min(weight.shape[0], weight[0].numel())


def _prepare_svdiff(pipe, path: Path, *, scale: float, **_) -> _Plan:
    files = [path] if path.is_file() else [path / n for n in SVDIFF_FILES if (path / n).is_file()]
    triples = []
    for file in files:
        if file.name not in SVDIFF_FILES:
            raise fail(file, f"an SVDiff file must be named one of {', '.join(SVDIFF_FILES)} "
                             "(the name says whether it shifts the UNet or the text encoder)")
        model = getattr(pipe, SVDIFF_FILES[file.name])
        deltas, _ = read_tensors(file)
        if not deltas:
            raise fail(file, "holds no spectral shifts")
        for key, delta in deltas.items():
            target = _svdiff_target(model, key, file)
            _check_shape(file, key, delta.shape, (spectral_size(target),))
            triples.append((key, target, spectral_weight(target, delta, scale)))
    return _Plan([swap_step(_checked_pairs(path, triples))])


def _svdiff_target(model, key: str, file: Path) -> torch.nn.Parameter:
    """The weight a delta key shifts. svdiff-pytorch writes `<module>.delta` (the module's
    weight); the study writes `<module>.<attr>.delta`, and torch's parametrize names the
    same `<module>.parametrizations.<attr>.0.delta`."""
    if not key.endswith(".delta"):
        raise fail(file, f"{key}: expected SVDiff keys ending in .delta")
    name = re.sub(r"\.parametrizations\.(\w+)\.0$", r".\1", key[:-len(".delta")])
    name = _model_key(model, name)
    module, _, attr = name.rpartition(".")
    param = _parameter(model, name, "weight")
    if param is None and module:
        param = _parameter(model, module, attr)
    if param is None:
        raise fail(file, f"{key}: this model's {type(model).__name__} has no such weight "
                         "(a concept made for another base model?)")
    return param


def _parameter(model, module_name: str, attr: str) -> torch.nn.Parameter | None:
    try:
        return model.get_submodule(module_name)._parameters.get(attr)
    except AttributeError:
        return None


# -- textual inversion ----------------------------------------------------------------

def _prepare_textual_inversion(pipe, path: Path, *, phrase: str | None, **_) -> _Plan:
    file = _named_or_single(path, TI_FILES)
    file_token, embedding = _ti_embedding(file)
    token = phrase or file_token
    if not token:
        raise fail(file, "the embedding does not name its token; give the concept phrase (--concept-phrase)")
    embeddings = {token: embedding}
    _check_embeddings(pipe, file, embeddings)
    return _Plan([tokens_step(pipe, embeddings)], token=token)


def _named_or_single(path: Path, names: tuple[str, ...]) -> Path:
    if path.is_file():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    return _weight_files(path)[0]  # detect_format found exactly one


def _ti_embedding(file: Path) -> tuple[str | None, torch.Tensor]:
    """(token in the file, embedding) from diffusers' {token: tensor}, A1111's
    {"string_to_param": {"*": tensor}, "name": ...} / {"emb_params": tensor}, or a bare tensor."""
    weights, _ = read_weights(file)
    token, embedding = None, weights
    if isinstance(weights, dict) and "string_to_param" in weights:
        params = weights["string_to_param"]
        embedding = params.get("*") if isinstance(params, dict) else None
        token = weights.get("name") if isinstance(weights.get("name"), str) else None
    elif isinstance(weights, dict) and len(weights) == 1:
        (token, embedding), = weights.items()
        token = None if token == "emb_params" or not isinstance(token, str) else token
    if not _is_embedding(embedding):
        raise fail(file, "expected a textual-inversion embedding: "
                         "{token: tensor of shape (dim,) or (vectors, dim)}")
    return token, embedding


def _check_embeddings(pipe, file: Path, embeddings: dict[str, torch.Tensor]) -> None:
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    vocab = pipe.tokenizer.get_vocab()
    for token, embedding in embeddings.items():
        if embedding.shape[-1] != dim:
            raise fail(file, f"the embedding for {token!r} has size {embedding.shape[-1]}, but this model's "
                             f"text encoder has {dim} (a concept made for another base model?)")
        if not torch.isfinite(embedding).all():
            raise fail(file, f"the embedding for {token!r} holds NaN or infinite values")
        taken = [t for t in _vector_tokens(token, embedding) if t in vocab]
        if taken:
            raise fail(file, f"the token {taken[0]!r} is already in the tokenizer; choose another concept phrase")


def _vector_tokens(token: str, embedding: torch.Tensor) -> list[str]:
    """The tokens diffusers adds for an embedding (one per vector)."""
    n = embedding.shape[0] if embedding.ndim == 2 else 1
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def tokens_step(pipe, embeddings: dict[str, torch.Tensor]) -> Step:
    """Add tokens with diffusers' `load_textual_inversion`; undo unloads them and puts
    back the original embedding matrix and vocabulary size."""
    def apply() -> Undo:
        encoder = pipe.text_encoder
        module = encoder.get_input_embeddings()
        saved = (module.weight.data, module.num_embeddings, encoder.config.vocab_size)
        before = set(pipe.tokenizer.added_tokens_encoder)

        def undo() -> None:
            added = [t for t in pipe.tokenizer.added_tokens_encoder if t not in before]
            if added:
                pipe.unload_textual_inversion(added)
            # unload_textual_inversion builds a new embedding module and leaves the config's
            # vocab_size grown; restore the originals themselves.
            encoder.set_input_embeddings(module)
            module.weight.data, module.num_embeddings, encoder.config.vocab_size = saved

        try:
            for token, embedding in embeddings.items():
                pipe.load_textual_inversion(embedding, token=token)
        except BaseException:
            undo()
            raise
        return undo
    return apply


# -- Custom Diffusion -----------------------------------------------------------------

CD_KEY = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_[qkv]|to_out)_custom_diffusion"
                    r"(?:\.0)?\.(?P<kind>weight|bias)$")


def _prepare_custom_diffusion(pipe, path: Path, *, phrase: str | None, **_) -> _Plan:
    """Custom Diffusion's attention weights replace the attention projections they were
    trained for. diffusers runs them in its own attention processors; putting them into
    the projections computes the same and keeps working under the samplers that install
    their own processors (masked, Photoswap)."""
    folder = path if path.is_dir() else path.parent
    file = next((folder / n for n in CUSTOM_DIFFUSION_FILES if (folder / n).is_file()), path)
    weights, _ = read_weights(file)
    if not isinstance(weights, dict):
        raise fail(file, "expected a {name: tensor} dictionary of attention weights")
    # diffusers' .bin files list untrained attention layers with empty entries.
    weights = {k: v for k, v in weights.items() if not (isinstance(v, dict) and not v)}
    triples = [_cd_triple(pipe.unet, key, value, file) for key, value in weights.items()]
    triples += _cd_zero_biases(pipe.unet, weights)
    embeddings = _cd_tokens(folder)
    _check_embeddings(pipe, folder, embeddings)
    token = " ".join(embeddings) or None
    missing = [t for t in embeddings if phrase is not None and t not in phrase.split()]
    if missing:
        raise fail(folder, f"the concept phrase {phrase!r} must contain the modifier token {missing[0]!r}")
    steps = [swap_step(_checked_pairs(file, triples))]
    if embeddings:
        steps.append(tokens_step(pipe, embeddings))
    return _Plan(steps, token=token)


def _cd_triple(unet, key: str, value, file: Path):
    """(key, the projection weight or bias it replaces, value)."""
    m = CD_KEY.match(key)
    if m is None or not isinstance(value, torch.Tensor):
        raise fail(file, f"{key}: not a Custom Diffusion attention weight")
    try:
        attn = unet.get_submodule(m["attn"])
    except AttributeError:
        attn = None
    if not hasattr(attn, "to_k"):
        raise fail(file, f"{key}: this model has no attention layer {m['attn']} "
                         "(a concept made for another base model?)")
    projection = attn.to_out[0] if m["proj"] == "to_out" else getattr(attn, m["proj"])
    target = getattr(projection, m["kind"])
    if target is None:
        raise fail(file, f"{key}: this model's layer has no {m['kind']}")
    return key, target, value


def _cd_zero_biases(unet, weights: dict) -> list:
    """Custom Diffusion's q/k/v projections have no bias: where the base layer has one,
    it is zeroed while the concept is applied (the processor would bypass it)."""
    triples = []
    for key in weights:
        m = CD_KEY.match(key)
        if m and m["proj"] != "to_out" and m["kind"] == "weight":
            projection = getattr(unet.get_submodule(m["attn"]), m["proj"])
            if projection.bias is not None:
                bias = projection.bias
                triples.append((key.replace(".weight", ".bias"), bias, torch.zeros_like(bias)))
    return triples


def _cd_tokens(folder: Path) -> dict[str, torch.Tensor]:
    """Modifier-token embeddings saved beside the weights (`<new1>.bin`: {"<new1>": tensor})."""
    embeddings = {}
    for file in _weight_files(folder):
        if file.name in CUSTOM_DIFFUSION_FILES:
            continue
        weights, _ = read_weights(file)
        single = isinstance(weights, dict) and len(weights) == 1
        token, embedding = next(iter(weights.items())) if single else (None, None)
        if not (isinstance(token, str) and _is_embedding(embedding)):
            raise fail(file, "expected a modifier-token embedding {token: tensor} "
                             "beside the Custom Diffusion weights")
        embeddings.update(weights)
    return embeddings


# -- LoRA -----------------------------------------------------------------------------

# After diffusers' `lora_state_dict` (which also converts kohya keys) a layer's two
# matrices are named in one of diffusers' generations of LoRA naming.
LORA_KEY = re.compile(r"^(?P<component>unet|text_encoder)\.(?P<module>.+?)(?P<sep>[._])"
                      r"(?P<role>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
                      r"\.weight$")
UP_ROLES = ("lora_B", "lora.up", "lora_linear_layer.up")
TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _prepare_lora(pipe, path: Path, *, scale: float, **_) -> _Plan:
    """LoRA through diffusers' `load_lora_weights`, given one uniform layout: PEFT names
    and each layer's alpha / rank (and `scale`) folded into its up matrix. diffusers
    0.42 drops layers silently when one file mixes its naming generations (kohya text
    encoders with attention and MLP layers) and misreads per-layer alphas there."""
    if importlib.util.find_spec("peft") is None:
        raise UserError("--concept: LoRA concepts need the peft package (pip install peft)")
    if any(getattr(getattr(pipe, c), "peft_config", None) for c in ("unet", "text_encoder")):
        raise UserError("--concept: this model already has LoRA adapters loaded; unload them first")
    file = _named_or_single(path, LORA_FILES)
    raw, metadata = read_tensors(file)
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in raw):
        raise fail(file, "DoRA LoRAs are not supported")
    try:
        converted, network_alphas = pipe.lora_state_dict(dict(raw))  # reads only; the pipeline is untouched
    except Exception as e:
        raise fail(file, f"not a LoRA layout diffusers can read ({_first_line(e)})") from None
    layers = _lora_layers(pipe, converted, file)
    alphas = _lora_alphas(pipe, network_alphas, metadata, layers, file)
    state_dict = {}
    for (component, module), (down, up) in layers.items():
        rank = down.shape[0]
        alpha, rslora = alphas.get((component, module), (rank, False))
        factor = scale * alpha / (math.sqrt(rank) if rslora else rank)
        state_dict[f"{component}.{module}.lora_A.weight"] = down
        state_dict[f"{component}.{module}.lora_B.weight"] = up * factor
    return _Plan([lora_step(pipe, state_dict, set(layers), file)])


def _lora_layer_name(pipe, component: str, module: str, sep: str) -> str:
    """The module path in the pipeline of a LoRA layer named in any diffusers generation."""
    if sep == "_":  # old attention-processor names: `...attn1.processor.to_q_lora.down`
        parent, _, projection = module.rpartition(".")
        parent = parent.removesuffix(".processor")
        if component == "unet":
            projection = "to_out.0" if projection == "to_out" else projection
        else:
            projection = TEXT_PROJECTIONS.get(projection, projection)
        module = f"{parent}.{projection}"
    return _model_key(getattr(pipe, component), module)


def _lora_layers(pipe, state_dict: dict, file: Path) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """{(component, module path): (down, up)}, every layer checked against the pipeline."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = LORA_KEY.match(key)
        if m is None:
            raise fail(file, f"{key}: not a LoRA weight of a UNet or text encoder layer this loader knows")
        name = _lora_layer_name(pipe, m["component"], m["module"], m["sep"])
        pairs.setdefault((m["component"], name), {})["up" if m["role"] in UP_ROLES else "down"] = value
    if not pairs:
        raise fail(file, "holds no LoRA layers")
    layers = {}
    for (component, name), pair in pairs.items():
        if set(pair) != {"down", "up"}:
            lacking = "up" if "down" in pair else "down"
            raise fail(file, f"the LoRA layer {component}.{name} lacks its {lacking} matrix")
        layers[(component, name)] = (pair["down"], pair["up"])
        _check_lora_layer(getattr(pipe, component), component, name, pair["down"], pair["up"], file)
    return layers


def _check_lora_layer(model, component: str, name: str, down, up, file: Path) -> None:
    label = f"{component}.{name}"
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise fail(file, f"the LoRA layer {label} does not exist in this model "
                         "(a concept made for another base model?)") from None
    if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
        raise fail(file, f"the LoRA layer {label} is a {type(layer).__name__}; "
                         "only Linear and Conv2d layers are supported")
    weight = layer.weight
    rank = down.shape[0]
    want_down = (rank, *weight.shape[1:])
    want_up = (weight.shape[0], rank, *([1] * (weight.ndim - 2)))
    _check_shape(file, f"{label} (down)", down.shape, want_down)
    _check_shape(file, f"{label} (up)", up.shape, want_up)
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise fail(file, f"the LoRA layer {label} holds NaN or infinite values")


def _lora_alphas(pipe, network_alphas, metadata: dict, layers, file: Path) -> dict[tuple, tuple[float, bool]]:
    """{(component, module): (alpha, rsLoRA)} from kohya's alphas or diffusers' saved
    LoraConfig; layers without one have alpha = rank (scale 1)."""
    alphas = {}
    for key, alpha in (network_alphas or {}).items():
        layer = _alpha_layer(pipe, key.removesuffix(".alpha"))
        if layer is not None:
            alphas[layer] = (float(alpha), False)
    configs = _lora_configs(metadata, file)
    for component, module in layers:
        config = configs.get(component, {})
        if config.get("lora_alpha") is not None:
            alphas[(component, module)] = (float(_peft_alpha(config, module)), bool(config.get("use_rslora")))
    return alphas


def _alpha_layer(pipe, name: str) -> tuple[str, str] | None:
    """The layer of a kohya alpha as diffusers renames it: `unet.<module>` or the key of
    the layer's down matrix."""
    m = LORA_KEY.match(name)
    if m is not None:
        return m["component"], _lora_layer_name(pipe, m["component"], m["module"], m["sep"])
    component, _, module = name.partition(".")
    if component not in ("unet", "text_encoder"):
        return None
    return component, _lora_layer_name(pipe, component, module, ".")


def _peft_alpha(config: dict, module: str) -> float:
    """A layer's alpha by PEFT's rule: the first `alpha_pattern` key that ends its path."""
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            return value
    return config["lora_alpha"]


def _lora_configs(metadata: dict, file: Path) -> dict[str, dict]:
    """diffusers' LoRA metadata ({"unet.r": ..., "unet.lora_alpha": ...}) per component."""
    text = metadata.get("lora_adapter_metadata")
    if not text:
        return {}
    try:
        flat = json.loads(text)
    except ValueError as e:
        raise fail(file, f"its LoRA metadata is not valid JSON ({e})") from None
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, name = key.partition(".")
        configs.setdefault(component, {})[name] = value
    if any(config.get("use_dora") for config in configs.values()):
        raise fail(file, "DoRA LoRAs are not supported")
    return configs


def lora_step(pipe, state_dict: dict, layers: set, file: Path) -> Step:
    """Load with diffusers, then check every layer arrived with scale 1 (its factor is
    folded in); otherwise unload again and say so."""
    def apply() -> Undo:
        undo = pipe.unload_lora_weights
        try:
            pipe.load_lora_weights(dict(state_dict), adapter_name=LORA_ADAPTER)
        except Exception as e:
            undo()
            raise fail(file, f"diffusers could not load this LoRA ({_first_line(e)})") from None
        lost = sorted(f"{c}.{m}" for c, m in layers if not _has_lora(getattr(pipe, c).get_submodule(m)))
        if lost:
            undo()
            raise fail(file, f"diffusers did not load {len(lost)} LoRA layers as given (first: {lost[0]})")
        return undo
    return apply


def _has_lora(layer) -> bool:
    scaling = getattr(layer, "scaling", {})
    return LORA_ADAPTER in getattr(layer, "lora_A", {}) and scaling.get(LORA_ADAPTER) == 1.0


PREPARE: dict[str, Callable[..., _Plan]] = {
    "dreambooth": _prepare_dreambooth,
    "lora": _prepare_lora,
    "textual_inversion": _prepare_textual_inversion,
    "custom_diffusion": _prepare_custom_diffusion,
    "svdiff": _prepare_svdiff,
}
