"""The denoising loop: diffusers parity, the identities of docs/samplers.md, rows evaluated, callback."""

import functools

import pytest
import torch
from diffusers import StableDiffusionPipeline

from personalize.sampling.engine import run
from personalize.errors import UserError
from personalize.sampling.samplers import configure, plan, total_rows
from tests import helpers
from tests.helpers import RowCounter, rel_diff

STEPS, SIZE = 8, 128
TOL = 1e-4


sample = functools.partial(helpers.sample, steps=STEPS, size=SIZE)


def diffusers_latents(pipe, prompt, w, seed=0, num_images=1, negative_prompt=None):
    reference = StableDiffusionPipeline(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    return reference(prompt, num_inference_steps=STEPS, guidance_scale=w, height=SIZE, width=SIZE,
                     generator=torch.Generator("cpu").manual_seed(seed), num_images_per_prompt=num_images,
                     negative_prompt=negative_prompt, output_type="latent").images


@pytest.mark.parametrize("num_images", [1, 2])
def test_concept_equals_diffusers_pipeline(pipe, prompts, num_images):
    ours = sample(pipe, prompts, "concept", seed=3, num_images=num_images, w=7.0).latents
    theirs = diffusers_latents(pipe, prompts.concept, 7.0, seed=3, num_images=num_images)
    assert ours.shape == theirs.shape
    assert rel_diff(ours, theirs) < TOL


def test_concept_equals_diffusers_with_negative_prompt(pipe, prompts):
    ours = run(pipe, prompts, configure("concept", {"w": 5.0}, STEPS), seed=1, height=SIZE, width=SIZE,
               negative_prompt="blurry", decode=False).latents
    theirs = diffusers_latents(pipe, prompts.concept, 5.0, seed=1, negative_prompt="blurry")
    assert rel_diff(ours, theirs) < TOL


def test_superclass_equals_diffusers_on_superclass_prompt(pipe, prompts):
    ours = sample(pipe, prompts, "superclass", w=7.0).latents
    assert rel_diff(ours, diffusers_latents(pipe, prompts.superclass, 7.0)) < TOL


def test_prompt_matters(pipe, prompts):
    """The demo model reacts to the prompt: concept and superclass latents differ clearly."""
    a = sample(pipe, prompts, "concept").latents
    b = sample(pipe, prompts, "superclass").latents
    assert rel_diff(a, b) > 0.05


IDENTITIES = [
    (("mixed", {"w_s": 0.0, "w_c": 6.0}), ("concept", {"w": 6.0})),
    (("mixed", {"w_c": 0.0, "w_s": 6.0}), ("superclass", {"w": 6.0})),
    (("switching", {"t_sw": 0, "w": 7.0}), ("concept", {"w": 7.0})),
    (("switching", {"t_sw": STEPS, "w": 7.0}), ("superclass", {"w": 7.0})),
    (("multistage", {"t_sw": 0, "w_c": 4.0, "w_s": 3.0}), ("mixed", {"w_c": 4.0, "w_s": 3.0})),
    (("multistage", {"w_c": 0.0, "w_s": 3.0, "t_sw": 3}), ("superclass", {"w": 3.0})),
]


@pytest.mark.parametrize("left,right", IDENTITIES, ids=lambda x: f"{x[0]}{x[1]}")
def test_identities(left, right):
    """These samplers act only through their plans (rows and weights per step; no hooks,
    masks, fusion or swaps), and the loop only follows the plan: equal plans are the
    identity. Comparing two UNet runs here would only show that the loop is deterministic."""
    assert plan(configure(*left, STEPS)) == plan(configure(*right, STEPS))


def test_identity_plans_can_differ():
    """Negative control: plan equality is not vacuous; a weight or a switch step changes it."""
    assert plan(configure("mixed", {"w_s": 0.5, "w_c": 6.0}, STEPS)) != plan(configure("concept", {"w": 6.0}, STEPS))
    assert plan(configure("switching", {"t_sw": 1}, STEPS)) != plan(configure("concept", {}, STEPS))


def test_switching_in_between_differs(pipe, prompts):
    """The identities are not vacuous: a switch in the middle is neither end."""
    mid = sample(pipe, prompts, "switching", t_sw=STEPS // 4).latents
    assert rel_diff(mid, sample(pipe, prompts, "concept").latents) > 10 * TOL
    assert rel_diff(mid, sample(pipe, prompts, "superclass").latents) > 10 * TOL


def test_mixed_is_eq6_at_every_step(pipe, prompts):
    seen = []
    run(pipe, prompts, configure("mixed", {"w_c": 2.0, "w_s": 5.0}, STEPS), height=SIZE, width=SIZE,
        callback=seen.append, decode=False)
    assert [s["step"] for s in seen] == list(range(STEPS))
    for info in seen:
        e = info["predictions"]
        assert set(e) == {"u", "C", "S"}
        expected = e["u"] + 5.0 * (e["S"] - e["u"]) + 2.0 * (e["C"] - e["u"])
        torch.testing.assert_close(info["noise_pred"], expected, rtol=1e-5, atol=1e-5)


def test_per_step_list_equals_scalar_and_acts(pipe, prompts):
    scalar = sample(pipe, prompts, "mixed", w_c=3.0, w_s=4.0).latents
    listed = sample(pipe, prompts, "mixed", w_c=[3.0] * STEPS, w_s=[4.0] * STEPS).latents
    assert torch.equal(scalar, listed)
    ramp = sample(pipe, prompts, "mixed", w_c=[3.0] * STEPS, w_s=[0.0] * (STEPS // 2) + [4.0] * (STEPS // 2))
    assert rel_diff(ramp.latents, scalar) > 1e-3
    assert ramp.rows == 2 * (STEPS // 2) + 3 * (STEPS // 2)


@pytest.mark.parametrize("name,params", [
    ("concept", {}), ("superclass", {}), ("mixed", {}), ("mixed", {"w_s": 0.0}), ("switching", {"t_sw": 3}),
    ("multistage", {"t_sw": 3}),
])
def test_rows_counted_equal_cost_table(pipe, prompts, name, params):
    """The denoiser sees exactly the rows the plan names: nothing unused is evaluated."""
    counter = RowCounter(pipe.unet)
    try:
        result = sample(pipe, prompts, name, num_images=2, **params)
    finally:
        counter.close()
    expected = total_rows(plan(configure(name, params, STEPS)), num_images=2)
    assert counter.rows == result.rows == expected
    assert len(counter.calls) == STEPS  # one batched call per step


def test_bad_size(pipe, prompts):
    with pytest.raises(UserError, match="--height: 100 must be a positive multiple of 8"):
        run(pipe, prompts, configure("concept", {}, 2), height=100, width=128)


def test_decoded_images(pipe, prompts):
    result = run(pipe, prompts, configure("concept", {}, 2), height=SIZE, width=SIZE, num_images=2)
    assert len(result.images) == 2 and result.images[0].size == (SIZE, SIZE)
