"""Masked sampling, Photoswap and ProFusion: identities, the hooks themselves, errors."""

import functools

import pytest
import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from personalize.sampling.attention import AttentionHooks, token_attention
from personalize.sampling.engine import run
from personalize.errors import UserError
from personalize.prompts import prompt_pair
from personalize.sampling.samplers import C, S, U, Mask, Step, Swap, configure, plan, total_rows
from tests import helpers
from tests.helpers import RowCounter, rel_diff

STEPS, SIZE, TOL = 8, 128, 1e-4


sample = functools.partial(helpers.sample, steps=STEPS, size=SIZE)


PLAN_IDENTITIES = [
    (("masked", {"t_sw": STEPS, "w_c0": 2.0, "w_s0": 5.0}), ("mixed", {"w_c": 2.0, "w_s": 5.0})),
    (("profusion", {"r": 0.0, "w_c": 3.0, "w_s": 4.0}), ("mixed", {"w_c": 3.0, "w_s": 4.0})),
    (("photoswap", {"t_sf": 0, "t_cm": 0, "t_sm": 0, "w": 6.0}), ("concept", {"w": 6.0})),
]

# Identities that hold only if a mechanism works: the empty mask at q = 1 (strict `>`)
MASK_IDENTITIES = [
    (("masked", {"q": 1.0, "t_sw": 0, "w_c": 3.0, "w_s": 4.0}), ("superclass", {"w": 7.0})),
    (("masked", {"q": 1.0, "t_sw": 0, "mask_source": "concept"}), ("superclass", {"w": 7.0})),
]


@pytest.mark.parametrize("left,right", PLAN_IDENTITIES, ids=lambda x: f"{x[0]}{x[1]}")
def test_plan_identities(left, right):
    """At these values no mask, fusion or swap is planned: the plans are equal, and the
    loop only follows the plan."""
    assert plan(configure(*left, STEPS)) == plan(configure(*right, STEPS))


@pytest.mark.parametrize("left,right", MASK_IDENTITIES, ids=lambda x: f"{x[0]}{x[1]}")
def test_mask_identities(pipe, prompts, left, right):
    assert plan(configure(*left, STEPS)) != plan(configure(*right, STEPS))  # the mask does the work
    a = sample(pipe, prompts, left[0], seed=4, num_images=2, **left[1]).latents
    b = sample(pipe, prompts, right[0], seed=4, num_images=2, **right[1]).latents
    assert rel_diff(a, b) < TOL


def test_mask_identity_fails_with_a_broken_mask(pipe, prompts, monkeypatch):
    """Negative control: with a mask that covers everything, masked(q = 1) is no longer
    superclass sampling, so the identity above does test the mask."""
    from personalize.sampling import guidance

    monkeypatch.setattr(guidance, "quantile_mask", lambda attention, q: torch.ones_like(attention, dtype=torch.bool)[:, None])
    (left, right) = MASK_IDENTITIES[0]
    a = sample(pipe, prompts, left[0], seed=4, num_images=2, **left[1]).latents
    b = sample(pipe, prompts, right[0], seed=4, num_images=2, **right[1]).latents
    assert rel_diff(a, b) > 10 * TOL


@pytest.mark.parametrize("name,variants", [
    ("masked", [{"q": 0.3}, {"q": 0.9}, {"t_sw": 1}, {"mask_source": "concept"}]),
    ("photoswap", [{"t_sf": 3, "t_cm": 0, "t_sm": 0}, {"t_sf": 0, "t_cm": 3, "t_sm": 0},
                   {"t_sf": 0, "t_cm": 0, "t_sm": 3}, {"t_sf": 2, "t_cm": 4, "t_sm": 6}]),
    ("profusion", [{"r": 0.5}, {"r": 1.0}, {"refine_steps": 2}]),
])
def test_hooks_act(pipe, prompts, name, variants):
    """Every step parameter changes the output: the hooks really act."""
    base = {"masked": ("mixed", {}), "photoswap": ("concept", {}), "profusion": ("mixed", {})}[name]
    outputs = [sample(pipe, prompts, base[0], **base[1]).latents]
    for params in variants:
        outputs.append(sample(pipe, prompts, name, **params).latents)
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert rel_diff(outputs[i], outputs[j]) > TOL, (i, j)


def test_profusion_noise_comes_from_the_run_generator(pipe, prompts):
    a = sample(pipe, prompts, "profusion", seed=7).latents
    b = sample(pipe, prompts, "profusion", seed=7).latents
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,params", [
    ("masked", {}), ("masked", {"w_c0": 1.0}), ("photoswap", {"t_sf": 2, "t_cm": 3, "t_sm": 5}),
    ("profusion", {}), ("profusion", {"refine_steps": 2}),
])
def test_rows_counted_equal_plan(pipe, prompts, name, params):
    counter = RowCounter(pipe.unet)
    try:
        result = sample(pipe, prompts, name, num_images=2, **params)
    finally:
        counter.close()
    assert counter.rows == result.rows == total_rows(plan(configure(name, params, STEPS)), num_images=2)


def test_masked_streams_map_and_mask(pipe, prompts):
    seen = []
    sample(pipe, prompts, "masked", num_images=2, callback=seen.append, t_sw=3, q=0.7)
    assert all(s["attention"] is None and s["mask"] is None for s in seen[:3])
    for s in seen[3:]:
        a, m = s["attention"], s["mask"]
        assert a.shape == (2, SIZE // 8, SIZE // 8) and m.shape == (2, 1, SIZE // 8, SIZE // 8)
        assert torch.all(a >= 0) and torch.all(a <= 1)
        kept = m.flatten(1).float().mean(1)
        assert torch.allclose(kept, torch.full_like(kept, 0.3), atol=1.5 / (SIZE // 8) ** 2)
        e = s["predictions"]
        inside = e[U] + 3.5 * (e[C] - e[U]) + 3.5 * (e[S] - e[U])
        outside = e[U] + 7.0 * (e[S] - e[U])
        expected = torch.where(m, inside, outside)
        torch.testing.assert_close(s["noise_pred"], expected, rtol=1e-5, atol=1e-5)


def cross_attention_layers(unet):
    return {name: m for name, m in unet.named_modules() if name.endswith("attn2")}


def test_captured_map_equals_softmax_of_that_token(pipe, prompts):
    """Each layer's captured map is softmax(Q K^T / sqrt(d)) at the token, computed here
    independently from the layer's own projections, averaged over heads."""
    layers = cross_attention_layers(pipe.unet)
    captured = {}
    handles = []
    for name, attn in layers.items():
        handles.append(attn.to_q.register_forward_hook(lambda m, i, o, n=name: captured.setdefault(n, {}).update(q=o)))
        handles.append(attn.to_k.register_forward_hook(lambda m, i, o, n=name: captured[n].update(k=o)))
    token = 5
    embeds = torch.cat([pipe.encode_prompt(p, "cpu", 1, False)[0] for p in ("", prompts.concept, prompts.superclass)])
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    step = Step((U, C, S), {C: 3.5, S: 3.5}, outside={S: 7.0}, mask=Mask(0.7, S))
    try:
        with torch.inference_mode(), AttentionHooks(pipe.unet, capture=True, token_index=token) as hooks:
            hooks.begin(0, step, 1)
            pipe.unet(x, 500, encoder_hidden_states=embeds)
            maps = dict(hooks.maps)
            averaged = hooks.attention_map((16, 16))
    finally:
        for h in handles:
            h.remove()
    assert set(maps) == set(layers)
    resized = []
    for name, attn in layers.items():
        q, k = captured[name]["q"], captured[name]["k"]
        b, n, inner = q.shape
        d = inner // attn.heads
        q = q.view(b, n, attn.heads, d).transpose(1, 2)[2:3]  # the superclass row
        k = k.view(b, -1, attn.heads, d).transpose(1, 2)[2:3]
        probs = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)[..., token].mean(1)
        torch.testing.assert_close(maps[name], probs, rtol=1e-5, atol=1e-6)
        h = int(round((n) ** 0.5))
        resized.append(F.interpolate(probs.view(1, 1, h, h), size=(16, 16), mode="bilinear", align_corners=False))
    torch.testing.assert_close(averaged, torch.stack(resized).mean(0)[:, 0], rtol=1e-5, atol=1e-6)


def test_photoswap_processor_swaps(pipe):
    """Swapped maps: concept rows attend with the superclass rows' queries and keys over
    their own values; swapped features: concept rows' output is the superclass rows'."""
    unet = pipe.unet
    self_name = next(n for n, m in unet.named_modules() if n.endswith("attn1"))
    attn = unet.get_submodule(self_name)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 64, attn.to_q.in_features, generator=g)
    n = 1
    out = {}
    with torch.inference_mode(), AttentionHooks(unet, swap=True) as hooks:
        for label, swap in (("maps", Swap(False, True, False)), ("features", Swap(True, False, False)),
                            ("none", Swap(False, False, False))):
            hooks.begin(0, Step((U, C, U, S), {C: 7.0}, swap=swap, weights_s={S: 7.0}), n)
            out[label] = attn.processor(attn, hidden).clone()
        plain = attn.to_q(hidden)
    heads = attn.heads
    def split(t):
        return t.view(4, -1, heads, t.shape[-1] // heads).transpose(1, 2)
    with torch.inference_mode():
        q, k, v = split(attn.to_q(hidden)), split(attn.to_k(hidden)), split(attn.to_v(hidden))
        swapped = F.scaled_dot_product_attention(q[3:4], k[3:4], v[1:2])
        expected = attn.to_out[0](swapped.transpose(1, 2).reshape(1, -1, heads * q.shape[-1]))
    torch.testing.assert_close(out["maps"][1:2], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["maps"][[0, 2, 3]], out["none"][[0, 2, 3]])
    torch.testing.assert_close(out["features"][1], out["features"][3])
    assert rel_diff(out["none"][1], out["none"][3]) > 1e-3
    assert plain.shape[0] == 4


def test_processors_restored_after_run_and_after_failure(pipe, prompts):
    before = dict(pipe.unet.attn_processors)
    sample(pipe, prompts, "photoswap")
    assert pipe.unet.attn_processors == before

    def boom(info):
        if info["step"] == 4:
            raise RuntimeError("boom")
    for name in ("masked", "photoswap"):
        with pytest.raises(RuntimeError, match="boom"):
            sample(pipe, prompts, name, callback=boom)
        assert pipe.unet.attn_processors == before
    with AttentionHooks(pipe.unet, swap=True):
        with pytest.raises(RuntimeError, match="already installed"):
            with AttentionHooks(pipe.unet, capture=True, token_index=1):
                pass
    assert pipe.unet.attn_processors == before


def test_profusion_needs_ddim(pipe, prompts):
    euler = StableDiffusionPipeline(**{**pipe.components,
                                       "scheduler": EulerDiscreteScheduler.from_config(pipe.scheduler.config)})
    with pytest.raises(UserError, match="ProFusion runs on DDIM only.*EulerDiscreteScheduler"):
        run(euler, prompts, configure("profusion", {}, 2), height=64, width=64)


def test_masked_needs_the_concept_phrase_in_the_prompt(pipe):
    prompts = prompt_pair("a photo of a {}", "sks dog", "dog")
    with pytest.raises(UserError, match="not among the tokens"):
        run(pipe, prompts, configure("masked", {}, 4), height=64, width=64, concept_phrase="zzz toy")


def test_token_attention_formula():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, 10, 4, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    probs = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) / 2.0, dim=-1)
    torch.testing.assert_close(token_attention(q, k, 2, 0.5), probs[..., 2].mean(1))
