"""LoRA concepts, diffusers or kohya keys, applied through peft (arXiv:2106.09685)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import torch

from personalize.concepts.changes import Plan, Step, Undo, check_shape, model_key
from personalize.concepts.files import LORA_ADAPTER, LORA_FILES, fail, first_line, read_tensors
from personalize.concepts.textual_inversion import named_or_single
from personalize.errors import UserError

# After diffusers' `lora_state_dict` (which also converts kohya keys) a layer's two
# matrices are named in one of diffusers' generations of LoRA naming.
LORA_KEY = re.compile(r"^(?P<component>unet|text_encoder)\.(?P<module>.+?)(?P<sep>[._])"
                      r"(?P<role>lora_A|lora_B|lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up)"
                      r"\.weight$")
UP_ROLES = ("lora_B", "lora.up", "lora_linear_layer.up")
TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def prepare(pipe, path: Path, *, scale: float, **_) -> Plan:
    """LoRA through diffusers' `load_lora_weights`, given one uniform layout: PEFT names
    and each layer's alpha / rank (and `scale`) folded into its up matrix. diffusers
    0.42 drops layers silently when one file mixes its naming generations (kohya text
    encoders with attention and MLP layers) and misreads per-layer alphas there."""
    if importlib.util.find_spec("peft") is None:
        raise UserError("--concept: LoRA concepts need the peft package (pip install peft)")
    if any(getattr(getattr(pipe, c), "peft_config", None) for c in ("unet", "text_encoder")):
        raise UserError("--concept: this model already has LoRA adapters loaded; unload them first")
    file = named_or_single(path, LORA_FILES)
    raw, metadata = read_tensors(file)
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in raw):
        raise fail(file, "DoRA LoRAs are not supported")
    try:
        converted, network_alphas = pipe.lora_state_dict(dict(raw))  # reads only; the pipeline is untouched
    except Exception as e:
        raise fail(file, f"not a LoRA layout diffusers can read ({first_line(e)})") from None
    layers = _lora_layers(pipe, converted, file)
    alphas = _lora_alphas(pipe, network_alphas, metadata, layers, file)
    state_dict = {}
    for (component, module), (down, up) in layers.items():
        rank = down.shape[0]
        alpha, rslora = alphas.get((component, module), (rank, False))
        factor = scale * alpha / (math.sqrt(rank) if rslora else rank)
        state_dict[f"{component}.{module}.lora_A.weight"] = down
        state_dict[f"{component}.{module}.lora_B.weight"] = up * factor
    return Plan([lora_step(pipe, state_dict, set(layers), file)])


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
    return model_key(getattr(pipe, component), module)


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
    check_shape(file, f"{label} (down)", down.shape, want_down)
    check_shape(file, f"{label} (up)", up.shape, want_up)
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
            raise fail(file, f"diffusers could not load this LoRA ({first_line(e)})") from None
        lost = sorted(f"{c}.{m}" for c, m in layers if not _has_lora(getattr(pipe, c).get_submodule(m)))
        if lost:
            undo()
            raise fail(file, f"diffusers did not load {len(lost)} LoRA layers as given (first: {lost[0]})")
        return undo
    return apply


def _has_lora(layer) -> bool:
    scaling = getattr(layer, "scaling", {})
    return LORA_ADAPTER in getattr(layer, "lora_A", {}) and scaling.get(LORA_ADAPTER) == 1.0
