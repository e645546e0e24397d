"""The DDIM schedule of Stable Diffusion 1.x/2 base, as the study samples with it."""

from __future__ import annotations

from diffusers import DDIMScheduler

# One home for these settings: the demo, tiny and benchmark models all use them.
DDIM_SETTINGS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                 "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def ddim_scheduler():
    """A fresh `DDIMScheduler` with `DDIM_SETTINGS` (DDIM: arXiv 2010.02502)."""

    return DDIMScheduler(**DDIM_SETTINGS)
