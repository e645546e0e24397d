import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from .helpers import built_once

# The test models are tiny: a second thread costs more than it brings (and far more on a
# busy machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pipe():
    """The demo pipeline in memory (seeded random weights)."""
    from personalize.models.demo import build_pipeline

    p = build_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo model written to disk by `python -m personalize demo-model`."""
    from personalize.cli import main

    out = tmp_path_factory.mktemp("demo") / "model"
    assert main(["demo-model", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def prompts():
    from personalize.prompts import prompt_pair

    return prompt_pair("a photo of a {} on the beach", "sks dog", "dog")



@pytest.fixture(scope="session")
def quick_world(tmp_path_factory):
    """`world build --quick` once for the whole suite: (folder, its world.json record).
    Tests that change the folder work on a copy."""
    from personalize.world.build import build_world

    return built_once(tmp_path_factory, "quick-world", lambda out: build_world(out, quick=True, check=False))
