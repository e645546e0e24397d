"""Guidance rules of the study: small pure functions of noise predictions.

Names follow docs/samplers.md: `e_u` unconditional (negative prompt), `e_C`
concept prompt, `e_S` superclass prompt. Nothing here touches a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def guide(e_u: torch.Tensor | None, terms: Mapping[str, tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Classifier-free guidance over several conditions: `e_u + sum_b w_b (e_b - e_u)`.

    One term `{C: w}` is concept sampling (eq. 4), `{S: w}` superclass sampling (eq. 5),
    `{C: w_c, S: w_s}` mixed sampling (eq. 6). When the weights sum to exactly 1 the
    unconditional prediction cancels and may be passed as None (it was not evaluated).
    """
    if e_u is None:
        return sum(w * e for e, w in terms.values())
    out = e_u
    for e, w in terms.values():
        out = out + w * (e - e_u)
    return out


def quantile_mask(attention: torch.Tensor, q: float) -> torch.Tensor:
    """The concept mask of eq. 9: `A > quantile(A, q)` per image (strict, torch semantics).

    `attention` is (images, H, W); the mask is boolean (images, 1, H, W), broadcasting
    over latent channels. At q = 1 it is empty.
    """
    flat = attention.flatten(1).float()
    threshold = torch.quantile(flat, q, dim=1)
    return (flat > threshold[:, None]).reshape(attention.shape).unsqueeze(1)


def masked(inside: torch.Tensor, outside: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked sampling, eq. 10: `M * inside + (1 - M) * outside`.

    `inside` is the mixed rule (concept and superclass), `outside` the superclass rule
    with the summed scale; see `samplers.masked_weights`.
    """
    m = mask.to(inside.dtype)
    return m * inside + (1 - m) * outside


def fusion_sigma(a_t: float, a_p: float, r: float) -> float:
    """ProFusion's fusion noise level: `r * sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))`.

    `a_t` is alphas_cumprod at the current timestep, `a_p` at the scheduler's previous
    one; at r = 1 it is DDIM's ancestral (eta = 1) standard deviation.
    """
    return r * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))


def epsilon(prediction: torch.Tensor, x_t: torch.Tensor, a_t: float, prediction_type: str) -> torch.Tensor:
    """The noise a denoiser's output stands for. A v prediction (Salimans & Ho,
    arXiv:2202.00512, eq. 2ff.: v = sqrt(a_t) eps - sqrt(1 - a_t) x_0) gives
    eps = sqrt(a_t) v + sqrt(1 - a_t) x_t; an epsilon prediction is itself. The map is
    affine in the prediction with weights that sum to one over a guidance rule's terms,
    so guiding v and converting equals converting and guiding eps."""
    if prediction_type == "epsilon":
        return prediction
    if prediction_type == "v_prediction":
        return math.sqrt(a_t) * prediction + math.sqrt(1 - a_t) * x_t
    raise ValueError(f"no epsilon from a {prediction_type!r} prediction")


def fusion_update(x_t: torch.Tensor, e_tilde: torch.Tensor, z: torch.Tensor,
                  sigma: float, a_t: float, a_p: float) -> torch.Tensor:
    """ProFusion's fusion step at one timestep (an ancestral step to t-1, re-noised to t):

    `x_t - e~ sigma^2 sqrt(1 - a_t) / (1 - a_p) + sigma z sqrt((1 - a_t)(2 - 2 a_p - sigma^2)) / (1 - a_p)`.
    """
    drift = sigma ** 2 * math.sqrt(1 - a_t) / (1 - a_p)
    spread = sigma * math.sqrt((1 - a_t) * (2 - 2 * a_p - sigma ** 2)) / (1 - a_p)
    return x_t - drift * e_tilde + spread * z
