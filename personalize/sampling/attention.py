"""Attention processors for the samplers that reach inside the denoiser.

`AttentionHooks` installs `StudyAttnProcessor` on the denoiser's attention layers (a
UNet's or a PixArt transformer's; all of them use diffusers' `Attention`) and
restores the original processors on exit, also when the run raised. Before each denoiser
call the loop calls `begin(step_index, step, images)`: the processors never count calls.

- Masked sampling: in cross-attention layers, the attention probabilities of ONE key
  position (the concept identifier) for the rows of the mask's source branch, averaged
  over heads, with the layer's attention mask (PixArt's text padding) applied as in the
  layer itself; only that (images, queries) map is kept, never a full attention matrix.
- Photoswap: the concept-conditional rows take the superclass-conditional rows' queries
  and keys, and attention mask where there is one (a swapped attention map is attention
  with the other branch's queries and keys over this branch's values, so fused attention
  still serves), or their output features.

Everything else is diffusers' `AttnProcessor2_0`, scaled-dot-product attention included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from personalize.sampling.samplers import C, S, Step


class AttentionHooks:
    """Context manager: `with AttentionHooks(denoiser, capture=..., swap=..., token_index=...) as hooks`.

    With neither `capture` nor `swap` it installs nothing.
    """

    def __init__(self, denoiser, *, capture: bool = False, swap: bool = False, token_index: int | None = None):
        self.denoiser = denoiser
        self.capture, self.swap = capture, swap
        self.token_index = token_index
        self.step_index: int | None = None
        self.step: Step | None = None
        self.images = 0
        self.maps: dict[str, torch.Tensor] = {}  # layer name -> (images, queries), this step only
        self._original = None

    # -- installation -------------------------------------------------------------------
    def __enter__(self):
        if not (self.capture or self.swap):
            return self
        if getattr(self.denoiser, "_personalize_hooked", False):
            raise RuntimeError("attention hooks are already installed on this denoiser")
        self._original = dict(self.denoiser.attn_processors)
        processors = {}
        for name, original in self._original.items():
            module = self.denoiser.get_submodule(name.removesuffix(".processor"))
            cross = bool(module.is_cross_attention)
            if self.swap or cross:
                processors[name] = StudyAttnProcessor(self, name.removesuffix(".processor"), cross)
            else:
                processors[name] = original
        self.denoiser.set_attn_processor(processors)
        self.denoiser._personalize_hooked = True
        return self

    def __exit__(self, *exc):
        if self._original is not None:
            self.denoiser.set_attn_processor(self._original)
            self.denoiser._personalize_hooked = False
            self._original = None
        return False

    # -- per step -------------------------------------------------------------------------
    def begin(self, step_index: int, step: Step | None, images: int) -> None:
        """Say which step the next denoiser call is and how its batch is laid out."""
        self.step_index, self.step, self.images = step_index, step, images
        self.maps = {}

    def rows_of(self, branch: str, occurrence: int = -1) -> slice:
        """The batch rows of a branch in the current call."""
        positions = [k for k, b in enumerate(self.step.rows) if b == branch]
        k = positions[occurrence]
        return slice(k * self.images, (k + 1) * self.images)

    def record(self, layer: str, token_map: torch.Tensor) -> None:
        self.maps[layer] = token_map

    def attention_map(self, size) -> torch.Tensor:
        """The mean over layers of this step's token maps, each resized bilinearly to
        `size` (the latent height and width): (images, H, W)."""
        if not self.maps:
            raise RuntimeError("no cross-attention map was captured in this step")
        height, width = size
        total = None
        for token_map in self.maps.values():
            total_q = token_map.shape[-1]
            h = round(math.sqrt(total_q * height / width))
            w = total_q // h
            grid = token_map.reshape(-1, 1, h, w).float()
            if (h, w) != (height, width):
                grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
            total = grid if total is None else total + grid
        return (total / len(self.maps))[:, 0]


def token_attention(query: torch.Tensor, key: torch.Tensor, token: int, scale: float,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """`softmax(Q K^T * scale + bias)` at one key position, averaged over heads.

    query (b, heads, queries, d), key (b, heads, keys, d), bias broadcasting to
    (b, heads, queries, keys) as scaled-dot-product attention's mask (float: added to the
    logits; bool: True attends) -> (b, queries)."""
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if bias is not None and bias.dtype == torch.bool:  # True: attend, as in scaled-dot-product attention
        logits = logits.masked_fill(~bias, float("-inf"))
    elif bias is not None:
        logits = logits + bias.float()
    return logits.softmax(dim=-1)[..., token].mean(dim=1)


# Copied from diffusers.models.attention_processor.AttnProcessor2_0 with the study's two hook
# points added (Photoswap's query/key and feature swaps, the masked sampler's token map)
# and the deprecation shim for `scale` dropped.
class StudyAttnProcessor:
    """diffusers' `AttnProcessor2_0` with the study's two hook points (see module doc)."""

    def __init__(self, hooks: AttentionHooks, name: str, cross: bool):
        self.hooks, self.name, self.cross = hooks, name, cross

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        hooks, step = self.hooks, self.hooks.step
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        swap = step.swap if step is not None else None
        if swap and (swap.cross_maps if self.cross else swap.self_maps):
            concept, superclass = hooks.rows_of(C), hooks.rows_of(S)
            query, key = query.clone(), key.clone()
            query[concept], key[concept] = query[superclass], key[superclass]
            if attention_mask is not None:
                attention_mask = attention_mask.clone()
                attention_mask[concept] = attention_mask[superclass]
        if self.cross and step is not None and step.mask is not None:
            rows = hooks.rows_of(step.mask.source)
            bias = attention_mask[rows] if attention_mask is not None else None
            hooks.record(self.name, token_attention(query[rows], key[rows], hooks.token_index, head_dim ** -0.5,
                                                    bias))

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        if swap and swap.features and not self.cross:
            hidden_states[hooks.rows_of(C)] = hidden_states[hooks.rows_of(S)]

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
