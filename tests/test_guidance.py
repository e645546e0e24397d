"""The pure guidance rules against the paper's equations, on random tensors."""

import math

import pytest
import torch

from personalize.sampling import guidance


@pytest.fixture
def eps():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 8, 8, generator=g) for _ in range(3)]


def test_guide_is_eq4_eq5_eq6(eps):
    e_u, e_c, e_s = eps
    assert torch.equal(guidance.guide(e_u, {"C": (e_c, 7.0)}), e_u + 7.0 * (e_c - e_u))
    assert torch.equal(guidance.guide(e_u, {"S": (e_s, 5.0)}), e_u + 5.0 * (e_s - e_u))
    mixed = guidance.guide(e_u, {"C": (e_c, 2.5), "S": (e_s, 4.5)})
    torch.testing.assert_close(mixed, e_u + 4.5 * (e_s - e_u) + 2.5 * (e_c - e_u), rtol=0, atol=1e-5)


def test_guide_without_unconditional_when_weights_sum_to_one(eps):
    e_u, e_c, e_s = eps
    with_u = guidance.guide(e_u, {"C": (e_c, 0.25), "S": (e_s, 0.75)})
    without_u = guidance.guide(None, {"C": (e_c, 0.25), "S": (e_s, 0.75)})
    torch.testing.assert_close(with_u, without_u, rtol=0, atol=1e-5)


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_quantile_mask_keeps_fraction(q):
    attention = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = guidance.quantile_mask(attention, q)
    assert mask.shape == (3, 1, 16, 16) and mask.dtype == torch.bool
    kept = mask.flatten(1).float().mean(1)
    # 256 distinct values: exactly floor((1 - q) * 255 + ...) positions lie strictly above the quantile
    expected = torch.tensor([(a.flatten() > torch.quantile(a.flatten(), q)).float().mean() for a in attention])
    assert torch.equal(kept, expected)
    assert torch.allclose(kept, torch.full_like(kept, 1 - q), atol=1.5 / 256)


def test_quantile_mask_empty_at_one():
    attention = torch.rand(2, 8, 8)
    assert not guidance.quantile_mask(attention, 1.0).any()


def test_masked_rule_is_eq10(eps):
    e_u, e_c, e_s = eps
    mask = guidance.quantile_mask(torch.rand(2, 8, 8), 0.5)
    inside = e_u + 3.5 * (e_c - e_u) + 3.5 * (e_s - e_u)
    outside = e_u + 7.0 * (e_s - e_u)
    out = guidance.masked(inside, outside, mask)
    m = mask.expand_as(e_u)
    assert torch.equal(out[m], inside[m]) and torch.equal(out[~m], outside[~m])


def test_fusion_sigma_is_ddim_ancestral_at_r1():
    a_t, a_p = 0.3, 0.5
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    assert guidance.fusion_sigma(a_t, a_p, 1.0) == pytest.approx(math.sqrt(var))
    assert guidance.fusion_sigma(a_t, a_p, 0.0) == 0.0


@pytest.mark.parametrize("a_t,a_p", [(0.05, 0.08), (0.3, 0.5), (0.9, 0.93)])
def test_fusion_at_r1_is_ancestral_step_then_renoise(a_t, a_p):
    """At r = 1 the fusion step equals a DDIM eta=1 step to t-1 then forward diffusion back
    to t: the same mean (noise at zero) and the same variance of the added noise."""
    g = torch.Generator().manual_seed(2)
    x_t, e = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    sigma = guidance.fusion_sigma(a_t, a_p, 1.0)
    # ancestral DDIM step (eta = 1), noise z1, then re-noise with z2
    x0 = (x_t - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
    mean_prev = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - sigma ** 2) * e
    mean_back = math.sqrt(a_t / a_p) * mean_prev
    var_back = (a_t / a_p) * sigma ** 2 + (1 - a_t / a_p)
    fused_mean = guidance.fusion_update(x_t, e, torch.zeros_like(x_t), sigma, a_t, a_p)
    torch.testing.assert_close(fused_mean, mean_back, rtol=1e-10, atol=1e-10)
    unit = torch.ones_like(x_t)
    spread = guidance.fusion_update(torch.zeros_like(x_t), torch.zeros_like(x_t), unit, sigma, a_t, a_p)
    assert float(spread[0, 0]) ** 2 == pytest.approx(var_back, rel=1e-10)


def test_fusion_identity_at_r0():
    x = torch.randn(2, 4, 8, 8)
    out = guidance.fusion_update(x, torch.randn_like(x), torch.randn_like(x), 0.0, 0.4, 0.6)
    assert torch.equal(out, x)
