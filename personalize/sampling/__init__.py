"""Sampling: guidance rules, sampler plans, the denoising loop, attention hooks, pipeline adapters."""
