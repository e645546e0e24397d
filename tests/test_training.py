"""Concept training (personalize.training) on the tiny demo model at 64 px, a few steps each."""

import json

import pytest
import torch

from personalize.concepts import apply_concept
from personalize.concepts.svdiff import spectral_weight as loader_spectral_weight
from personalize.training import loop, svdiff, train_concept

SIZE = 64


def star_images(n=3, size=80):
    """Yellow stars on blue at different places: a concept with some structure."""
    from PIL import Image, ImageDraw

    images = []
    for k in range(n):
        image = Image.new("RGB", (size + 16 * k, size), (30, 60, 160))
        draw = ImageDraw.Draw(image)
        cx, cy, r = size // 2 + 8 * k, size // 2, size // 3
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r // 2
            angle = torch.pi / 2 + i * torch.pi / 5
            points.append((cx + radius * float(torch.cos(torch.tensor(angle))),
                           cy - radius * float(torch.sin(torch.tensor(angle)))))
        draw.polygon(points, fill=(250, 210, 40))
        images.append(image)
    return images


def snapshot(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, c).state_dict().items()}


def same_as(pipe, snap) -> bool:
    now = snapshot(pipe)
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def sample_latents(pipe, prompt, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=SIZE, width=SIZE, generator=g, output_type="latent").images


def train_capturing(monkeypatch, pipe, **kwargs):
    """train_concept, also returning the trained in-memory copies (loop.Models)."""
    captured = {}
    original = loop.copy_models

    def capture(*args, **kw):
        captured["models"] = original(*args, **kw)
        return captured["models"]

    monkeypatch.setattr(loop, "copy_models", capture)
    summary = train_concept(pipe, star_images(), **kwargs)
    return summary, captured["models"]


@pytest.fixture(scope="module")
def svdiff_run(pipe, tmp_path_factory):
    before = snapshot(pipe)
    mp = pytest.MonkeyPatch()
    try:
        out = tmp_path_factory.mktemp("svdiff") / "concept"
        summary, models = train_capturing(mp, pipe, phrase="sks star", superclass="star", method="svdiff",
                                          out=out, steps=12, resolution=SIZE, seed=0)
    finally:
        mp.undo()
    return dict(summary=summary, models=models, before=before, out=out)


def test_svdiff_probe_loss_falls(svdiff_run):
    s = svdiff_run["summary"]
    assert s["method"] == "svdiff" and s["steps"] == 12 and not s["stopped"]
    assert s["probe_loss_end"] < s["probe_loss_start"]


def test_svdiff_leaves_the_pipeline_bitwise_unchanged(pipe, svdiff_run):
    assert same_as(pipe, svdiff_run["before"])
    assert not any(hasattr(m, "parametrizations") for m in pipe.unet.modules())


def test_svdiff_folder_layout_and_record(svdiff_run):
    out = svdiff_run["out"]
    concept = json.loads((out / "concept.json").read_text())
    assert {"spectral_shifts.safetensors", "spectral_shifts_te.safetensors", "concept.json"} <= {p.name for p in out.iterdir()}
    for key in ("phrase", "superclass", "references", "method", "steps", "hyperparameters", "base_model",
                "seconds", "final_loss"):
        assert key in concept, key
    assert concept["phrase"] == "sks star" and concept["superclass"] == "star"
    assert concept["hyperparameters"]["lr"] == 1e-3 and concept["hyperparameters"]["lr_1d"] == 1e-6
    assert len(concept["base_model"]["sha256"]) == 64
    assert all((out / r).is_file() for r in concept["references"]) and len(concept["references"]) == 3
    from safetensors.torch import load_file
    te = load_file(str(out / "spectral_shifts_te.safetensors"))
    assert all(k.startswith("text_model.") and k.endswith(".delta") for k in te)
    assert "text_model.embeddings.token_embedding.delta" in te


def test_svdiff_saved_deltas_are_the_trained_ones(svdiff_run):
    """The files hold exactly the in-memory deltas, one per shifted weight."""
    from safetensors.torch import load_file
    models, out = svdiff_run["models"], svdiff_run["out"]
    unet = load_file(str(out / "spectral_shifts.safetensors"))
    shifted = dict(svdiff.shifted_modules(models.unet))
    assert set(unet) == {f"{n}.delta" for n in shifted}
    for name, module in shifted.items():
        assert torch.equal(unet[f"{name}.delta"], svdiff.shift_of(module).delta.detach())
    assert any(v.abs().max() > 0 for v in unet.values())


def test_svdiff_loaded_with_apply_concept_equals_the_trained_model(pipe, svdiff_run):
    """apply_concept on the folder gives the trained weights exactly (loader and trainer
    both use the residual form) and remove() restores the base model bitwise."""
    models = svdiff_run["models"]
    concept = apply_concept(pipe, svdiff_run["out"])
    try:
        assert concept.format == "svdiff"
        for component in ("unet", "text_encoder"):
            loaded = dict(getattr(pipe, component).named_modules())
            for name, module in svdiff.shifted_modules(getattr(models, component)):
                trained = svdiff.shifted_weight(module).detach()
                got = loaded[name].weight.detach()
                assert torch.equal(got, trained), name
    finally:
        concept.remove()
    assert same_as(pipe, svdiff_run["before"])


def test_svdiff_changes_concept_samples(pipe, svdiff_run):
    base = sample_latents(pipe, "a photo of sks star")
    concept = apply_concept(pipe, svdiff_run["out"])
    try:
        shifted = sample_latents(pipe, "a photo of sks star")
    finally:
        concept.remove()
    assert (shifted - base).abs().max() > 1e-3
    assert torch.equal(sample_latents(pipe, "a photo of sks star"), base)


def test_zero_shifts_are_the_base_model_bitwise(pipe):
    import copy

    for w in (torch.randn(12, 7), torch.randn(6, 4, 3, 3), torch.rand(16) + 0.5, torch.randn(50, 8)):
        assert torch.equal(loader_spectral_weight(w, torch.zeros(svdiff._svd(w)[1].shape)), w)
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    deltas = svdiff.add_shifts(unet)
    assert len(deltas) == len(svdiff.shifted_modules(pipe.unet))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    text = copy.deepcopy(pipe.text_encoder).requires_grad_(False)
    svdiff.add_shifts(text)
    ids = pipe.tokenizer(["a photo of sks star"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(unet(x, 10, encoder_hidden_states=ctx).sample,
                           pipe.unet(x, 10, encoder_hidden_states=ctx).sample)
        assert torch.equal(text(ids)[0], pipe.text_encoder(ids)[0])


def test_selection_on_the_sd2_architecture():
    """The study's counts on Stable Diffusion 2 base (built on the meta device: shapes only)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from personalize.concepts.svdiff import spectral_size
    from personalize.models.architectures import SD2
    from personalize.training.dreambooth import select
    from personalize.training.recipes import QKV

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD2.unet)
        text = CLIPTextModel(CLIPTextConfig(**SD2.text_encoder))
    for model, tensors, scalars, norms, qkv, qkv_scalars in ((unet, 391, 225_877, 109, 96, 75_120_640),
                                                              (text, 187, 142_460, 47, 138, 72_422_400)):
        shifted = svdiff.shifted_modules(model)
        assert len(shifted) == tensors
        assert sum(spectral_size(m.weight) for _, m in shifted) == scalars
        assert sum(svdiff.is_one_d(n) for n, _ in shifted) == norms
        chosen = select(model, QKV)
        assert len(chosen) == qkv and sum(p.numel() for p in chosen.values()) == qkv_scalars


def test_prior_preservation_runs_and_leaves_the_pipeline(pipe, tmp_path):
    before = snapshot(pipe)
    summary = train_concept(pipe, star_images(2), phrase="sks star", superclass="star", method="lora",
                            out=tmp_path / "c", steps=2, resolution=SIZE, prior_preservation=True,
                            class_images=2, class_image_steps=2)
    assert summary["prior_preservation"] and summary["class_images"] == 2
    assert same_as(pipe, before)


def test_loader_spectral_weight_is_the_papers_formula():
    """The residual form equals U diag(relu(S + delta)) Vh (arXiv 2303.11305, eq. 1); a
    negative control: a shift that relu clips (delta < -S) zeroes that direction."""
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3)
    u, s, vh = torch.linalg.svd(w.reshape(6, -1), full_matrices=False)
    delta = torch.randn(6) * 0.3
    delta[0] = -s[0] - 1.0
    paper = ((u * torch.relu(s + delta)) @ vh).reshape(w.shape)
    got = loader_spectral_weight(w, delta)
    assert torch.allclose(got, paper, atol=1e-5)
    assert not torch.allclose(got, w, atol=1e-3)
    assert torch.equal(loader_spectral_weight(w, torch.zeros(6)), w)
