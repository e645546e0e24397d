"""Shared test helpers."""

import json
import os
import shutil
from pathlib import Path

import torch
from filelock import FileLock


def built_once(tmp_path_factory, name: str, build) -> tuple[Path, object]:
    """`build(folder)` run once per test run, also when pytest-xdist spreads the suite over
    worker processes (the README's test command does): the first worker to ask builds
    under a file lock, the others wait for it and reuse the folder, read-only. Returns
    (folder, what `build` returned, which must be JSON)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent                    # the run's folder, above every worker's own
    folder, record = root / "shared" / name, root / "shared" / f"{name}.json"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if not record.is_file():
            shutil.rmtree(folder, ignore_errors=True)   # a build that failed half-way
            record.write_text(json.dumps(build(folder)))
    return folder, json.loads(record.read_text())


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
