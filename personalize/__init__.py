"""personalize: the sampling methods of personalized text-to-image generation, on diffusers."""

__version__ = "0.1.0"
