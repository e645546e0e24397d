"""Shared test helpers."""

import torch


def rel_diff(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class RowCounter:
    """Counts the batch rows of every denoiser call (a forward pre-hook)."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls.append(args[0].shape[0])

    @property
    def rows(self):
        return sum(self.calls)

    def close(self):
        self.handle.remove()


def sample(pipe, prompts, name, *, steps, size, seed=0, num_images=1, callback=None, **params):
    """One run of sampler `name` on the demo concept ("sks dog"), latents only (no decode)."""
    from personalize.sampling.engine import run
    from personalize.sampling.samplers import configure

    return run(pipe, prompts, configure(name, params, steps), seed=seed, num_images=num_images, height=size,
               width=size, concept_phrase="sks dog", callback=callback, decode=False)
