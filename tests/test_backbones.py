"""SD-XL and PixArt-alpha: diffusers parity, every sampler with the identities of docs/samplers.md,
attention hooks on a transformer, loading."""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, StableDiffusionXLPipeline

from personalize.sampling.attention import AttentionHooks
from personalize.sampling.backbones import PixArtBackbone, SDXLBackbone, backbone, batch_conditioning, default_size
from personalize.sampling.engine import run
from personalize.errors import UserError
from personalize.models.loading import load_pipeline
from personalize.sampling.samplers import C, SAMPLERS, S, U, Mask, Step, Swap, configure, plan, total_rows
from personalize.models.tiny import build_pixart_pipeline, build_sdxl_pipeline
from tests.helpers import RowCounter, rel_diff

STEPS, H, W, TOL = 4, 64, 96, 1e-4
BACKBONES = ["sdxl", "pixart"]


@pytest.fixture(scope="module")
def pipes():
    built = {"sdxl": build_sdxl_pipeline(), "pixart": build_pixart_pipeline()}
    for p in built.values():
        p.set_progress_bar_config(disable=True)
    return built


@pytest.fixture(scope="module")
def concept_of(pipes, prompts):
    """Concept sampling's latents (two images, seed 0) on each backbone, computed once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = sample(pipes[name], prompts, "concept", num_images=2).latents
        return cache[name]
    return get


def denoiser(pipe):
    return backbone(pipe).denoiser


def sample(pipe, prompts, name, seed=0, num_images=1, callback=None, steps=STEPS, **params):
    return run(pipe, prompts, configure(name, params, steps), seed=seed, num_images=num_images, height=H, width=W,
               concept_phrase="sks dog", callback=callback, decode=False)


def diffusers_latents(pipe, prompt, w, seed=0, num_images=1, negative_prompt=None, steps=STEPS):
    kwargs = {}
    if isinstance(pipe, PixArtAlphaPipeline):  # its default negative prompt is "", and it takes no None
        kwargs = {"use_resolution_binning": False, "clean_caption": False}
        negative_prompt = negative_prompt or ""
    reference = type(pipe)(**pipe.components)
    reference.set_progress_bar_config(disable=True)
    return reference(prompt, num_inference_steps=steps, guidance_scale=w, height=H, width=W,
                     generator=torch.Generator("cpu").manual_seed(seed), num_images_per_prompt=num_images,
                     negative_prompt=negative_prompt, output_type="latent", **kwargs).images


# -- diffusers parity -----------------------------------------------------------------------

@pytest.mark.parametrize("num_images", [1, 2])
@pytest.mark.parametrize("name", BACKBONES)
def test_concept_equals_diffusers_pipeline(pipes, prompts, name, num_images):
    """Our empty negative prompt is diffusers' default: zero embeddings on SD-XL (its
    force_zeros_for_empty_prompt), the encoded "" on PixArt."""
    pipe = pipes[name]
    ours = sample(pipe, prompts, "concept", seed=3, num_images=num_images, w=7.0).latents
    theirs = diffusers_latents(pipe, prompts.concept, 7.0, seed=3, num_images=num_images)
    assert ours.shape == theirs.shape == (num_images, 4, H // 8, W // 8)
    assert rel_diff(ours, theirs) < TOL


@pytest.mark.parametrize("name", BACKBONES)
def test_concept_equals_diffusers_with_negative_prompt(pipes, prompts, name):
    pipe = pipes[name]
    ours = run(pipe, prompts, configure("concept", {"w": 5.0}, STEPS), seed=1, height=H, width=W,
               negative_prompt="blurry", decode=False).latents
    theirs = diffusers_latents(pipe, prompts.concept, 5.0, seed=1, negative_prompt="blurry")
    assert rel_diff(ours, theirs) < TOL
    assert rel_diff(ours, sample(pipe, prompts, "concept", seed=1, w=5.0).latents) > 10 * TOL


def test_sdxl_zero_negative_embeddings_only_without_negative_prompt(pipes):
    model = SDXLBackbone(pipes["sdxl"])
    with torch.inference_mode():
        empty = model.encode("", negative=True, size=(H, W))
        encoded = model.encode("", negative=False, size=(H, W))
    assert not empty["encoder_hidden_states"].any() and not empty["added_cond_kwargs"]["text_embeds"].any()
    assert encoded["encoder_hidden_states"].abs().sum() > 0
    assert empty["added_cond_kwargs"]["time_ids"].tolist() == [[H, W, 0, 0, H, W]]


def test_pixart_1024_resolution_conditioning_equals_diffusers(prompts):
    """At latent side 128 (PixArt-alpha 1024) the transformer also reads resolution and aspect ratio."""
    pipe = build_pixart_pipeline(sample_size=128)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.use_additional_conditions
    ours = sample(pipe, prompts, "concept", seed=2, num_images=2).latents
    assert rel_diff(ours, diffusers_latents(pipe, prompts.concept, 7.0, seed=2, num_images=2)) < TOL


def test_pixart_with_its_multistep_scheduler(pipes, prompts):
    """PixArt's own scheduler (DPM-Solver++) keeps a history: parity, and Photoswap's two
    trajectories each keep their own (the swap ends mid-run)."""
    dpm = DPMSolverMultistepScheduler.from_config(pipes["pixart"].scheduler.config)
    pipe = PixArtAlphaPipeline(**{**pipes["pixart"].components, "scheduler": dpm})
    pipe.set_progress_bar_config(disable=True)
    concept = sample(pipe, prompts, "concept", seed=4, steps=6).latents
    assert rel_diff(concept, diffusers_latents(pipe, prompts.concept, 7.0, seed=4, steps=6)) < TOL
    swapped = sample(pipe, prompts, "photoswap", seed=4, steps=6, t_sf=1, t_cm=2, t_sm=3).latents
    assert torch.isfinite(swapped).all() and rel_diff(swapped, concept) > TOL
    unswapped = sample(pipe, prompts, "photoswap", seed=4, steps=6, t_sf=0, t_cm=0, t_sm=0).latents
    assert rel_diff(unswapped, concept) < TOL


# -- every sampler, the identities of docs/samplers.md ----------------------------------------------------

# The plan identities hold on every backbone because the plan does not know the backbone
# (tests/test_engine.py and tests/test_attention.py compare the plans); what depends on
# the backbone is the attention hooks, so the mask identity runs on each.
IDENTITIES = [
    (("masked", {"q": 1.0, "t_sw": 0, "w_c": 3.0, "w_s": 4.0}), ("superclass", {"w": 7.0})),
]


@pytest.mark.parametrize("left,right", IDENTITIES, ids=lambda x: f"{x[0]}{x[1]}")
@pytest.mark.parametrize("name", BACKBONES)
def test_identities(pipes, prompts, name, left, right):
    a = sample(pipes[name], prompts, left[0], seed=5, num_images=2, **left[1]).latents
    b = sample(pipes[name], prompts, right[0], seed=5, num_images=2, **right[1]).latents
    assert rel_diff(a, b) < TOL


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("name", BACKBONES)
def test_every_sampler_runs_with_the_planned_rows(pipes, prompts, concept_of, name, sampler):
    """Each sampler (attention ones included) runs, evaluates exactly the rows of its plan in
    one call per step (ProFusion: two), and all but the identity cases leave concept sampling."""
    pipe = pipes[name]
    params = {"masked": {"t_sw": 1}, "switching": {"t_sw": 2}, "multistage": {"t_sw": 2},
              "photoswap": {"t_sf": 1, "t_cm": 2, "t_sm": 3}}.get(sampler, {})
    counter = RowCounter(denoiser(pipe))
    try:
        result = sample(pipe, prompts, sampler, num_images=2, **params)
    finally:
        counter.close()
    assert counter.rows == result.rows == total_rows(plan(configure(sampler, params, STEPS)), num_images=2)
    assert len(counter.calls) == STEPS * (2 if sampler == "profusion" else 1)
    assert result.latents.shape == (2, 4, H // 8, W // 8) and torch.isfinite(result.latents).all()
    if sampler != "concept":
        assert rel_diff(result.latents, concept_of(name)) > 10 * TOL


@pytest.mark.parametrize("name", BACKBONES)
def test_masked_map_has_the_latent_size(pipes, prompts, name):
    seen = []
    sample(pipes[name], prompts, "masked", num_images=2, callback=seen.append, t_sw=1, q=0.7)
    assert seen[0]["attention"] is None
    for s in seen[1:]:
        a, m = s["attention"], s["mask"]
        assert a.shape == (2, H // 8, W // 8) and m.shape == (2, 1, H // 8, W // 8)
        assert torch.all(a >= 0) and torch.all(a <= 1)
        kept = m.flatten(1).float().mean(1)
        assert torch.allclose(kept, torch.full_like(kept, 0.3), atol=1.5 / (H * W // 64))
        e = s["predictions"]
        expected = torch.where(m, e[U] + 3.5 * (e[C] - e[U]) + 3.5 * (e[S] - e[U]), e[U] + 7.0 * (e[S] - e[U]))
        torch.testing.assert_close(s["noise_pred"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_decoded_images_and_default_size(pipes, prompts, name):
    pipe = pipes[name]
    result = run(pipe, prompts, configure("mixed", {}, 2), height=H, width=W, num_images=2)
    assert len(result.images) == 2 and result.images[0].size == (W, H)
    height, width = default_size(pipe)
    assert (height, width) == (128, 128)
    assert run(pipe, prompts, configure("concept", {}, 1), decode=False).latents.shape[-2:] == (16, 16)


@pytest.mark.parametrize("name", BACKBONES)
def test_bfloat16(pipes, prompts, name):
    pipe = copy.deepcopy(pipes[name]).to(dtype=torch.bfloat16)
    result = run(pipe, prompts, configure("masked", {"t_sw": 1}, 2), height=H, width=W, concept_phrase="sks dog")
    assert result.latents.dtype == torch.bfloat16 and torch.isfinite(result.latents).all()
    assert result.images[0].size == (W, H)


# -- attention hooks on PixArt's transformer -------------------------------------------------

def test_pixart_captured_map_is_the_softmax_with_the_padding_mask(pipes, prompts):
    """Each cross-attention layer's map is softmax(Q K^T / sqrt(d) + padding bias) at the
    token, computed here from the layer's own projections, averaged over heads."""
    pipe = pipes["pixart"]
    model = PixArtBackbone(pipe)
    layers = {n: m for n, m in pipe.transformer.named_modules() if n.endswith("attn2")}
    captured, handles = {}, []
    for n, attn in layers.items():
        handles.append(attn.to_q.register_forward_hook(lambda m, i, o, n=n: captured.setdefault(n, {}).update(q=o)))
        handles.append(attn.to_k.register_forward_hook(lambda m, i, o, n=n: captured[n].update(k=o)))
    token = model.token_index(prompts.concept, "sks dog")
    step = Step((U, C, S), {C: 3.5, S: 3.5}, outside={S: 7.0}, mask=Mask(0.7, S))
    x = torch.randn(3, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            conds = [model.encode(p, negative=False, size=(64, 96)) for p in ("", prompts.concept, prompts.superclass)]
            cond = batch_conditioning(conds, 1)
            with AttentionHooks(pipe.transformer, capture=True, token_index=token) as hooks:
                hooks.begin(0, step, 1)
                model(x, torch.tensor(500), cond)
                maps = dict(hooks.maps)
                averaged = hooks.attention_map((8, 12))
    finally:
        for h in handles:
            h.remove()
    assert set(maps) == set(layers)
    padding = (1 - cond["encoder_attention_mask"][2:3].float()) * -10000.0
    assert padding.min() < 0  # the superclass prompt is padded: the bias matters
    resized = []
    for n, attn in layers.items():
        q, k = captured[n]["q"], captured[n]["k"]
        d = q.shape[-1] // attn.heads
        q = q.view(3, -1, attn.heads, d).transpose(1, 2)[2:3]
        k = k.view(3, -1, attn.heads, d).transpose(1, 2)[2:3]
        probs = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + padding[:, None], dim=-1)[..., token].mean(1)
        torch.testing.assert_close(maps[n], probs, rtol=1e-5, atol=1e-6)
        assert probs.shape == (1, (8 // 2) * (12 // 2))  # the latent grid over the patch size
        grid = probs.view(1, 1, 4, 6)
        resized.append(F.interpolate(grid, size=(8, 12), mode="bilinear", align_corners=False))
    torch.testing.assert_close(averaged, torch.stack(resized).mean(0)[:, 0], rtol=1e-5, atol=1e-6)


def test_pixart_swapped_cross_maps_take_the_superclass_padding_mask(pipes):
    attn = pipes["pixart"].transformer.transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 6, attn.to_q.in_features, generator=g)
    context = torch.randn(4, 10, attn.to_k.in_features, generator=g)
    keep = torch.ones(4, 10)
    keep[1, 7:] = 0   # the concept prompt is longer than the superclass prompt
    keep[3, 5:] = 0
    bias = ((1 - keep) * -10000.0)[:, None]
    step = Step((U, C, U, S), {C: 7.0}, swap=Swap(False, False, True), weights_s={S: 7.0})
    with torch.inference_mode(), AttentionHooks(pipes["pixart"].transformer, swap=True) as hooks:
        hooks.begin(0, step, 1)
        out = attn.processor(attn, hidden, context, bias)
        heads = attn.heads

        def split(t):
            return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)
        q, k, v = split(attn.to_q(hidden)), split(attn.to_k(context)), split(attn.to_v(context))
        swapped = F.scaled_dot_product_attention(q[3:4], k[3:4], v[1:2], attn_mask=bias[3:4, None])
        expected = attn.to_out[0](swapped.transpose(1, 2).reshape(1, -1, heads * q.shape[-1]))
    torch.testing.assert_close(out[1:2], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_processors_restored(pipes, prompts, name):
    pipe = pipes[name]
    before = dict(denoiser(pipe).attn_processors)

    def boom(info):
        if info["step"] == 2:
            raise RuntimeError("boom")
    for sampler, params in (("masked", {"t_sw": 1}), ("photoswap", {"t_sf": 4, "t_cm": 4, "t_sm": 4})):
        with pytest.raises(RuntimeError, match="boom"):
            sample(pipe, prompts, sampler, callback=boom, **params)
        assert denoiser(pipe).attn_processors == before


# -- tokens ----------------------------------------------------------------------------------

def test_pixart_token_index_counts_no_start_token_and_lowercases(pipes):
    model = PixArtBackbone(pipes["pixart"])
    assert model.token_index("A photo of a SKS Dog", "sks dog") == 4  # a photo of a | sks
    with pytest.raises(UserError, match="past the 120 tokens"):
        model.token_index("a " * 130 + "sks dog", "sks dog")
    assert SDXLBackbone(pipes["sdxl"]).token_index("a photo of a sks dog", "sks dog") == 5  # after <|startoftext|>


# -- loading -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BACKBONES)
def test_load_pipeline_reads_the_family_and_caches(pipes, prompts, name, tmp_path):
    pipes[name].save_pretrained(tmp_path / name)
    loaded = load_pipeline(str(tmp_path / name))
    assert type(loaded) is {"sdxl": StableDiffusionXLPipeline, "pixart": PixArtAlphaPipeline}[name]
    assert load_pipeline(str(tmp_path / name)) is loaded
    ours = sample(loaded, prompts, "concept", seed=6).latents
    assert rel_diff(ours, sample(pipes[name], prompts, "concept", seed=6).latents) < TOL


def test_unsupported_pipelines_are_refused(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    ddpm = DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                         down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2),
                        scheduler=DDPMScheduler())
    with pytest.raises(UserError, match="DDPMPipeline is not a supported pipeline"):
        backbone(ddpm)
    ddpm.save_pretrained(tmp_path / "ddpm")
    with pytest.raises(UserError, match="is a DDPMPipeline; supported pipelines: StableDiffusionPipeline"):
        load_pipeline(str(tmp_path / "ddpm"))
