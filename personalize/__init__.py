"""personalize: the sampling methods of personalized text-to-image generation, on diffusers.

The small public API: `configure` and `SAMPLERS` (the samplers and their parameters),
`run` (the denoising loop) and `load_pipeline`. `run` and `load_pipeline` import torch
and diffusers on first use, so `import personalize` stays light.
"""

__version__ = "0.1.0"

from personalize.sampling.samplers import SAMPLERS, configure

__all__ = ["SAMPLERS", "configure", "run", "load_pipeline", "__version__"]


def __getattr__(name):
    if name == "run":
        from personalize.sampling.engine import run

        return run
    if name == "load_pipeline":
        from personalize.models.loading import load_pipeline

        return load_pipeline
    raise AttributeError(f"module 'personalize' has no attribute {name!r}")
