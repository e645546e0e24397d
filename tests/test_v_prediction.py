"""v-prediction models (SD 2 at 768 px, the world): the loop steps them as diffusers'
pipeline does, and ProFusion reads the noise they stand for."""

import functools

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from personalize.sampling import guidance
from personalize.sampling.engine import run
from personalize.sampling.samplers import configure
from tests import helpers
from tests.helpers import rel_diff

STEPS, SIZE, TOL = 6, 128, 1e-4
sample = functools.partial(helpers.sample, steps=STEPS, size=SIZE)


@pytest.fixture(scope="module")
def v_pipe(pipe):
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    v = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
    v.set_progress_bar_config(disable=True)
    return v


def test_concept_on_v_model_equals_diffusers(v_pipe, prompts):
    ours = sample(v_pipe, prompts, "concept", seed=2, w=6.0).latents
    reference = StableDiffusionPipeline(**v_pipe.components)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompts.concept, num_inference_steps=STEPS, guidance_scale=6.0, height=SIZE, width=SIZE,
                       generator=torch.Generator("cpu").manual_seed(2), output_type="latent").images
    assert rel_diff(ours, theirs) < TOL


def test_epsilon_from_v_is_the_noise():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    a = 0.3
    x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
    v = a ** 0.5 * eps - (1 - a) ** 0.5 * x0
    assert torch.allclose(guidance.epsilon(v, x_t, a, "v_prediction"), eps, atol=1e-6)
    assert guidance.epsilon(eps, x_t, a, "epsilon") is eps
    with pytest.raises(ValueError, match="sample"):
        guidance.epsilon(x0, x_t, a, "sample")


def test_guidance_commutes_with_the_conversion():
    """Mixed guidance of v predictions, converted, equals mixed guidance of the converted
    predictions (the weights sum to one), so every rule but ProFusion's may run on v."""
    torch.manual_seed(1)
    x_t = torch.randn(1, 4, 8, 8)
    e_u, e_c, e_s = (torch.randn(1, 4, 8, 8) for _ in range(3))
    to_eps = functools.partial(guidance.epsilon, x_t=x_t, a_t=0.4, prediction_type="v_prediction")
    mixed = guidance.guide(e_u, {"c": (e_c, 4.0), "s": (e_s, 3.0)})
    assert torch.allclose(to_eps(mixed), guidance.guide(to_eps(e_u), {"c": (to_eps(e_c), 4.0),
                                                                   "s": (to_eps(e_s), 3.0)}), atol=1e-5)


def test_profusion_on_v_model_uses_the_noise(v_pipe, prompts, monkeypatch):
    """ProFusion's fusion step gets the noise, not the raw v output: with the conversion
    switched off (a negative control) the result changes."""
    converted = sample(v_pipe, prompts, "profusion", seed=0).latents
    monkeypatch.setattr(guidance, "epsilon", lambda prediction, *a, **k: prediction)
    raw = sample(v_pipe, prompts, "profusion", seed=0).latents
    assert torch.isfinite(converted).all()
    assert rel_diff(converted, raw) > 1e-3
