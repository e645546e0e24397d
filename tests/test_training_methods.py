"""DreamBooth, LoRA and textual inversion training; diffusers' own loaders on our files;
SD-XL; methods that do not apply."""

import copy

import pytest
import torch

from personalize.concepts import apply_concept
from personalize.errors import UserError
from personalize.training import train_concept
from tests.test_training import SIZE, same_as, sample_latents, snapshot, star_images, train_capturing


def with_parts(pipe, **parts):
    """A pipeline sharing `pipe`'s components except `parts`."""
    return type(pipe)(**{**pipe.components, **parts})


def isolated(pipe):
    """A pipeline with its own copies of UNet, text encoder and tokenizer (diffusers' loaders change them)."""
    return with_parts(pipe, unet=copy.deepcopy(pipe.unet), text_encoder=copy.deepcopy(pipe.text_encoder),
                      tokenizer=copy.deepcopy(pipe.tokenizer))


def trained_pipe(pipe, models):
    """The in-memory trained model as a pipeline."""
    for m in (models.unet, models.text_encoder):
        m.eval()
    return with_parts(pipe, unet=models.unet, text_encoder=models.text_encoder, tokenizer=models.tokenizer)


def test_lora_learns_and_diffusers_loads_our_file(pipe, tmp_path, monkeypatch):
    before = snapshot(pipe)
    out = tmp_path / "lora"
    summary, models = train_capturing(monkeypatch, pipe, phrase="sks star", superclass="star", method="lora",
                                      out=out, steps=8, resolution=SIZE, train_text_encoder=True, lr=2e-3)
    assert summary["probe_loss_end"] < summary["probe_loss_start"]
    assert same_as(pipe, before)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    prompt = "a photo of sks star"
    with torch.no_grad():
        in_memory = sample_latents(trained_pipe(pipe, models), prompt)
    concept = apply_concept(pipe, out)
    try:
        ours = sample_latents(pipe, prompt)
    finally:
        concept.remove()
    assert same_as(pipe, before)
    theirs_pipe = isolated(pipe)
    theirs_pipe.load_lora_weights(str(out))
    theirs = sample_latents(theirs_pipe, prompt)
    base = sample_latents(pipe, prompt)
    assert torch.equal(ours, in_memory)
    assert (theirs - ours).abs().max() < 1e-5
    assert (ours - base).abs().max() > 1e-4


def test_textual_inversion_learns_and_diffusers_loads_our_file(pipe, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    before = snapshot(pipe)
    vocab = len(pipe.tokenizer)
    out = tmp_path / "ti"
    summary, models = train_capturing(monkeypatch, pipe, phrase="<sks>", superclass="star",
                                      method="textual-inversion", out=out, steps=8, resolution=SIZE, lr=5e-2)
    assert summary["probe_loss_end"] < summary["probe_loss_start"]
    assert same_as(pipe, before) and len(pipe.tokenizer) == vocab
    embeds = load_file(str(out / "learned_embeds.safetensors"))
    assert list(embeds) == ["<sks>"] and embeds["<sks>"].shape == (1, 64)
    prompt = "a photo of <sks> star"
    in_memory = sample_latents(trained_pipe(pipe, models), prompt)
    concept = apply_concept(pipe, out)
    try:
        assert concept.token == "<sks>"
        ours = sample_latents(pipe, prompt)
        superclass_only = sample_latents(pipe, "a photo of a star")
    finally:
        concept.remove()
    assert same_as(pipe, before) and len(pipe.tokenizer) == vocab
    theirs_pipe = isolated(pipe)
    theirs_pipe.load_textual_inversion(str(out))
    theirs = sample_latents(theirs_pipe, prompt)
    assert torch.equal(ours, in_memory)
    assert (theirs - ours).abs().max() < 1e-5
    assert torch.equal(superclass_only, sample_latents(pipe, "a photo of a star"))


def test_dreambooth_trains_only_qkv_and_loads_exactly(pipe, tmp_path, monkeypatch):
    before = snapshot(pipe)
    out = tmp_path / "db"
    summary, models = train_capturing(monkeypatch, pipe, phrase="sks star", superclass="star", method="dreambooth",
                                      out=out, steps=6, resolution=SIZE, lr=5e-4)
    assert summary["probe_loss_end"] < summary["probe_loss_start"]
    assert same_as(pipe, before)
    for component in ("unet", "text_encoder"):
        base = getattr(pipe, component).state_dict()
        trained = getattr(models, component).state_dict()
        moved = {k for k in base if not torch.equal(base[k], trained[k])}
        assert moved and all(any(t in k for t in ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj"))
                             for k in moved), component
    concept = apply_concept(pipe, out)
    try:
        for component in ("unet", "text_encoder"):
            loaded, trained = getattr(pipe, component).state_dict(), getattr(models, component).state_dict()
            assert all(torch.equal(loaded[k], trained[k]) for k in loaded), component
    finally:
        concept.remove()
    assert same_as(pipe, before)


@pytest.fixture(scope="module")
def sdxl():
    from personalize.models.tiny import build_sdxl_pipeline

    p = build_sdxl_pipeline()
    p.set_progress_bar_config(disable=True)
    return p


def test_sdxl_lora_and_dreambooth(sdxl, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    prompt = "a photo of sks star"
    out = tmp_path / "lora"
    summary, models = train_capturing(monkeypatch, sdxl, phrase="sks star", superclass="star", method="lora",
                                      out=out, steps=3, resolution=SIZE, lr=1e-2, train_text_encoder=True)
    for m in (models.unet, models.text_encoder, models.text_encoder_2):
        m.eval()
    in_memory = sample_latents(with_parts(sdxl, unet=models.unet, text_encoder=models.text_encoder,
                                          text_encoder_2=models.text_encoder_2), prompt)
    theirs_pipe = with_parts(sdxl, unet=copy.deepcopy(sdxl.unet), text_encoder=copy.deepcopy(sdxl.text_encoder),
                             text_encoder_2=copy.deepcopy(sdxl.text_encoder_2))
    theirs_pipe.load_lora_weights(str(out))
    assert (sample_latents(theirs_pipe, prompt) - in_memory).abs().max() < 1e-5
    assert (in_memory - sample_latents(sdxl, prompt)).abs().max() > 1e-4

    out = tmp_path / "db"
    summary, models = train_capturing(monkeypatch, sdxl, phrase="sks star", superclass="star", method="dreambooth",
                                      out=out, steps=2, resolution=SIZE, lr=1e-3)
    assert {p.name for p in out.iterdir()} >= {"unet", "text_encoder", "text_encoder_2", "concept.json"}
    loaded = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert all(torch.equal(v, models.unet.state_dict()[k]) for k, v in loaded.items())


@pytest.mark.parametrize("method", ["svdiff", "textual-inversion"])
def test_methods_that_do_not_apply_to_sdxl(sdxl, tmp_path, method):
    with pytest.raises(UserError, match=f"{method} does not apply to SD-XL"):
        train_concept(sdxl, star_images(), phrase="<sks>", superclass="star", method=method, out=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_pixart_is_refused(tmp_path):
    from personalize.models.tiny import build_pixart_pipeline

    with pytest.raises(UserError, match="does not apply to PixArt-alpha"):
        train_concept(build_pixart_pipeline(), star_images(), phrase="sks star", superclass="star",
                      method="lora", out=tmp_path / "c")
    assert not (tmp_path / "c").exists()
