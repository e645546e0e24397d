"""The model a run uses when none is named (`loading.default_model`), in each situation,
and the image size read from a model folder. No GPU is needed: the checks are patched."""

import json

import pytest

from personalize.models import loading


@pytest.fixture
def demo_path(tmp_path, monkeypatch):
    path = tmp_path / "demo"
    monkeypatch.setattr(loading, "ensure_demo_model", lambda: path)
    return path


def world_at(monkeypatch, folder):
    monkeypatch.setattr(loading, "shipped_world_folder", lambda: folder)


def test_gpu_and_study_model_gives_sd2(monkeypatch, demo_path, tmp_path):
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading, "study_model_available", lambda timeout=5.0: True)
    world_at(monkeypatch, tmp_path / "world")
    model, why = loading.default_model()
    assert model == "stabilityai/stable-diffusion-2-base" and "GPU" in why


def test_gpu_without_the_study_model_gives_the_world(monkeypatch, demo_path, tmp_path):
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading, "study_model_available", lambda timeout=5.0: False)
    world_at(monkeypatch, tmp_path / "world")
    model, why = loading.default_model()
    assert model == str(tmp_path / "world") and "cannot be had" in why


def test_no_gpu_never_asks_for_the_study_model(monkeypatch, demo_path, tmp_path):
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    asked = []
    monkeypatch.setattr(loading, "study_model_available", lambda timeout=5.0: asked.append(1) or True)
    world_at(monkeypatch, tmp_path / "world")
    model, why = loading.default_model()
    assert model == str(tmp_path / "world") and "no CUDA GPU" in why and not asked


def test_a_cpu_run_on_a_gpu_machine_never_gets_sd2(monkeypatch, demo_path, tmp_path):
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: True)
    asked = []
    monkeypatch.setattr(loading, "study_model_available", lambda timeout=5.0: asked.append(1) or True)
    world_at(monkeypatch, tmp_path / "world")
    model, why = loading.default_model("cpu")
    assert model == str(tmp_path / "world") and "a run on cpu" in why and not asked
    assert loading.default_model("cuda")[0] == "stabilityai/stable-diffusion-2-base"   # the same machine, on CUDA


def test_no_gpu_no_world_gives_the_demo_model(monkeypatch, demo_path):
    monkeypatch.setattr(loading.torch.cuda, "is_available", lambda: False)
    world_at(monkeypatch, None)
    model, why = loading.default_model()
    assert model == str(demo_path) and "demo" in why


def test_model_size_is_sample_size_times_the_vae_factor(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"sample_size": 32}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64]}))
    assert loading.model_size(str(tmp_path)) == 64  # a world-sized model: 32 * 2
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64, 64, 64]}))
    assert loading.model_size(str(tmp_path)) == 256
    assert loading.model_size("org/name") is None


def test_lab_says_which_model_and_why(monkeypatch, demo_dir):
    from personalize.runs.lab import Lab

    monkeypatch.setattr("personalize.runs.lab.default_model", lambda: (str(demo_dir), "because a test says so"))
    lab = Lab()
    assert lab.model == str(demo_dir) and "because a test says so" in lab.banner()
