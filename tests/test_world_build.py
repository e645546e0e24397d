"""`world build --quick` end to end: what it writes loads with diffusers, open_clip and
the concept loader; its check measures every figure; bad folders get clear errors."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.errors import UserError
from personalize.models.tokenizer import clip_tokenizer
from personalize.world import build, check, models
from personalize.world.scene import CONCEPTS, codec_batch, instance_class, named_instance_batch


def test_build_records_every_part(quick_world):
    out, world = quick_world
    record = json.loads((out / "world.json").read_text())
    assert record == world      # every test leaves the shared quick world as built
    assert set(record["parts"]) == {"autoencoder", "denoiser", "instances", "continued", "metric_model", "concepts",
                                    "decoder"}
    assert record["parts"]["instances"]["names"] == build.identifier_words(clip_tokenizer(), build.QUICK.instances)
    for part in ("autoencoder", "denoiser", "instances", "continued", "metric_model", "decoder"):
        assert record["parts"][part]["steps"] > 0
        assert np.isfinite(record["parts"][part]["final_loss"])
    assert set(record["parts"]["concepts"]) == set(CONCEPTS)
    assert not (out / build.STATE_FILE).exists() and not (out / ".work").exists()


def test_continuation_trains_the_denoiser_on_and_writes_it_back(quick_world, tmp_path):
    from safetensors.torch import load_file

    out, _ = quick_world
    copy = tmp_path / "w"
    shutil.copytree(out, copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    before = load_file(str(weights))
    record = build.continue_denoiser(copy, dataclasses.replace(build.QUICK, continue_steps=2), seed=0)
    after = load_file(str(weights))
    assert record["steps"] == 2 and np.isfinite(record["final_loss"])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2          # the written denoiser is the trained one
    assert build.FULL.continue_minutes == 0 and build.WORLD6.continue_minutes == 0   # earlier worlds had no such stage


def test_the_world_latents_are_encoded_once_per_build(quick_world, tmp_path, monkeypatch):
    out, _ = quick_world
    vae = build.load_pipeline(out).vae
    n = 12
    first = build.world_latents(tmp_path, vae, n, seed=3)
    images, captions, masks = build.render_data(n, 3, with_masks=True)
    mean, std = build.encode(vae, images)
    assert torch.equal(first["mean"], mean) and torch.equal(first["std"], std) and first["captions"] == captions
    assert torch.equal(first["cover"], build.object_cover(masks))
    assert (tmp_path / ".work" / build.LATENTS_FILE).is_file()
    calls = []
    real = build.render_data
    monkeypatch.setattr(build, "render_data", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = build.world_latents(tmp_path, vae, n, seed=3)          # the continuation's call: read back
    assert calls == [] and torch.equal(again["mean"], mean) and again["captions"] == captions
    other = build.world_latents(tmp_path, vae, n, seed=4)          # another seed: made again
    assert calls == [(n, 4)] and not torch.equal(other["mean"], mean)


def test_pipeline_loads_with_diffusers(quick_world):
    from diffusers import StableDiffusionPipeline

    out, _ = quick_world
    pipe = StableDiffusionPipeline.from_pretrained(str(out), dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red ball in the snow", num_inference_steps=3, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == models.LATENT_CHANNELS
    assert pipe.vae.config.scaling_factor == pytest.approx(json.loads((out / "world.json").read_text())
                                                           ["parts"]["denoiser"]["scaling_factor"])


def test_concepts_load_and_change_the_model(quick_world):
    from personalize.concepts import apply_concept
    from personalize.prompts import prompt_pair
    from personalize.sampling.engine import run
    from personalize.sampling.samplers import configure

    out, _ = quick_world
    pipe = check.load_world_pipeline(out)
    pair = prompt_pair("a {} in the snow", "sks star", "star")
    config = configure("concept", steps=4)
    base = run(pipe, pair, config, seed=0, height=64, width=64, decode=False).latents
    concept = json.loads((out / "concepts" / "star" / "concept.json").read_text())
    assert concept["phrase"] == "sks star" and concept["method"] == "svdiff"
    assert len(concept["references"]) == 5
    applied = apply_concept(pipe, out / "concepts" / "star")
    tuned = run(pipe, pair, config, seed=0, height=64, width=64, decode=False).latents
    applied.remove()
    again = run(pipe, pair, config, seed=0, height=64, width=64, decode=False).latents
    assert not torch.equal(base, tuned)
    assert torch.equal(base, again)


def test_metric_model_embeds_images_and_texts(quick_world):
    out, _ = quick_world
    metric = check.load_world_metric(out)
    images = metric.clip_images([Image.new("RGB", (64, 64), 0), Image.new("RGB", (64, 64), (200, 200, 200))])
    texts = metric.clip_texts(["a photo of a red ball", "a photo of a blue box in the snow"])
    assert images.shape == (2, 64) and texts.shape == (2, 64)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_quick_check_measures_every_figure(quick_world, tmp_path):
    out = shutil.copytree(quick_world[0], tmp_path / "w")     # the check writes into world.json
    record = check.run_check(out, quick=True, log=lambda *_: None)
    names = [f["figure"] for f in record["figures"]]
    assert len(names) == 3 + 3 + 2 * 3 * 2 + 4
    assert all(0 <= f["images"] for f in record["figures"])
    assert [p["w_s"] for p in record["sweep"]] == list(range(8))
    assert "| figure | value |" in check.format_table(record)
    assert json.loads((out / "world.json").read_text())["check"] == record


def test_build_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        build.build_world(tmp_path, quick=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_check_names_a_missing_part(quick_world, tmp_path):
    out, _ = quick_world
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(UserError, match="denoiser"):
        check.check_world_folder(broken)
    shutil.copytree(out / "unet", broken / "unet")
    shutil.rmtree(broken / "concepts" / "ball")
    with pytest.raises(UserError, match="ball"):
        check.check_world_folder(broken)


def test_check_refuses_a_folder_that_is_not_a_world(tmp_path):
    with pytest.raises(UserError, match="not a world"):
        check.check_world_folder(tmp_path)
    with pytest.raises(UserError, match="not a folder"):
        check.check_world_folder(tmp_path / "absent")


def test_decoder_finetune_keeps_the_encoder_and_weighs_objects():
    from personalize.world.scene import codec_batch

    torch.manual_seed(0)
    vae = models.autoencoder().eval()
    images, masks = codec_batch(8, seed=3, with_masks=True)
    assert masks.shape == (8, 64, 64) and 0.05 < masks.mean() < 0.4
    assert np.array_equal(images, codec_batch(8, seed=3))     # the masks do not change the images
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    size = dataclasses.replace(build.QUICK, decoder_steps=3, vae_batch=4)
    vae, record = build.finetune_decoder(vae, images, masks, size, seed=0, detail_blur=2.0)
    assert record["steps"] == 3 and np.isfinite(record["final_loss"])
    # latents keep their meaning: the encoder is bitwise the same; the decoder learned
    assert all(torch.equal(encoder[k], v) for k, v in vae.encoder.state_dict().items())
    assert any(not torch.equal(decoder[k], v) for k, v in vae.decoder.state_dict().items())
    assert not any(p.requires_grad for p in vae.parameters())


def test_snr_normal_timesteps_favour_the_middle_of_the_schedule():
    scheduler = models.ddpm_scheduler()
    p = build.timestep_distribution(scheduler)
    assert torch.isclose(p.sum(), torch.tensor(1.0), atol=1e-5) and (p > 0).all()
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    middle = (snr > 0.1) & (snr < 10)
    # uniform draws give the SNR 0.1..10 band its share of timesteps; this distribution much more
    assert p[middle].sum() > middle.float().mean() + 0.2
    assert p[snr < 0.03].sum() < (snr < 0.03).float().mean() / 2


def test_latent_weights_weigh_the_object_patches():
    masks = np.zeros((2, 64, 64), bool)
    masks[0, 20:40, 24:44] = True          # a 20 px box: latent pixels 5..9 x 6..10
    w = build.cover_weights(build.object_cover(masks), 3.0)
    assert w.shape == (2, 1, 16, 16)
    assert torch.all(w[1] == 1.0)
    assert torch.all(w[0, 0, 5:10, 6:11] == 3.0) and w[0, 0, 0, 0] == 1.0 and w[0, 0, 12, 12] == 1.0
    assert int((w[0] == 3.0).sum()) == 25


def test_a_recipe_refuses_an_unknown_timestep_rule_or_text_encoder_when_it_is_made():
    # Refused when the recipe is made, before any part of a build has run.
    with pytest.raises(ValueError, match="timesteps must be 'uniform' or 'snr-normal', got 'lognormal'"):
        dataclasses.replace(build.QUICK, timesteps="lognormal")
    with pytest.raises(ValueError, match="text_encoder must be 'metric' or 'joint', got 'clip'"):
        dataclasses.replace(build.QUICK, text_encoder="clip")
    # The values the recipes use are taken.
    assert dataclasses.replace(build.QUICK, timesteps="uniform", text_encoder="joint").timesteps == "uniform"


def test_anchored_codec_pulls_its_channels_to_the_image_averages_and_the_class_codes():
    images, masks, classes = codec_batch(64, 0, with_masks=True, with_classes=True)
    codes = build.class_maps(masks, classes)
    x, x_masks, x_classes = codec_batch(16, 9, with_masks=True, with_classes=True)
    x, x_codes = build.to_tensor(x), build.class_maps(x_masks, x_classes)
    gaps = {}
    for anchor in (0.0, 5.0):   # the negative control: no anchor, no class codes
        size = dataclasses.replace(build.QUICK, vae_steps=12, vae_minutes=5.0, latent_anchor=anchor)
        vae, _ = build.train_autoencoder(images, size, seed=0, codes=codes if anchor else None)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        gaps[anchor] = (
            torch.nn.functional.mse_loss(dist.mean[:, :build.ANCHORED], torch.nn.functional.avg_pool2d(x, 4)).item(),
            torch.nn.functional.mse_loss(dist.mean[:, build.CLASS_CHANNEL:build.CLASS_CHANNEL + 1], x_codes).item())
        if anchor:
            # its decoder learned through noise of LATENT_NOISE: the posterior says so
            assert torch.allclose(dist.std, torch.full_like(dist.std, build.LATENT_NOISE), rtol=1e-4)
    # the class code needs the shape recognised: after 12 steps it is a weaker pull
    assert gaps[5.0][0] < 0.5 * gaps[0.0][0] and gaps[5.0][1] < 0.75 * gaps[0.0][1], gaps


def test_blurred_detail_softens_only_the_detail_channels():
    z = torch.randn(2, models.LATENT_CHANNELS, 16, 16, generator=torch.Generator().manual_seed(0))
    soft = build.blurred_detail(z, 1.5)
    kept = build.CLASS_CHANNEL + 1
    assert torch.equal(soft[:, :kept], z[:, :kept])
    assert soft[:, kept:].std() < 0.5 * z[:, kept:].std()            # white noise loses most of its variance
    assert torch.equal(build.blurred_detail(z, 0.0), z)
    both = build.blurred_detail(z, 1.5, 1.5)       # the picture too; the class code never
    assert torch.equal(both[:, build.ANCHORED:kept], z[:, build.ANCHORED:kept])
    assert both[:, :build.ANCHORED].std() < 0.5 * z[:, :build.ANCHORED].std()
    assert torch.equal(both[:, kept:], soft[:, kept:])


def test_class_code_stage_teaches_the_encoder_the_code_and_keeps_the_rest():
    images, masks, classes = codec_batch(32, 0, with_masks=True, with_classes=True)
    codes = build.class_maps(masks, classes)
    torch.manual_seed(0)
    vae = models.autoencoder().eval()
    x = build.to_tensor(images[:16])
    code = slice(build.CLASS_CHANNEL, build.CLASS_CHANNEL + 1)
    with torch.no_grad():
        before = vae.encode(x).latent_dist.mean
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    size = dataclasses.replace(build.QUICK, code_steps=30, code_batch=16, code_minutes=5.0)
    vae, record = build.train_class_code(vae, images, codes, size, seed=0)
    assert record["steps"] == 30 and np.isfinite(record["final_loss"])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
    mse = torch.nn.functional.mse_loss
    assert mse(dist.mean[:, code], codes[:16]) < 0.5 * mse(before[:, code], codes[:16])
    others = [c for c in range(models.LATENT_CHANNELS) if c != build.CLASS_CHANNEL]
    # the other channels move far less than the code: the decoder still reads them as before
    assert mse(dist.mean[:, others], before[:, others]) < 0.25 * mse(dist.mean[:, code], before[:, code])
    assert all(torch.equal(decoder[k], v) for k, v in vae.decoder.state_dict().items())
    assert torch.allclose(dist.std, torch.full_like(dist.std, build.LATENT_NOISE), rtol=1e-4)
    assert not any(p.requires_grad for p in vae.parameters())


def test_denoised_latents_are_the_denoisers_redraw_of_the_render(quick_world):
    out, _ = quick_world
    pipe = build.load_pipeline(out)
    images, captions = build.render_data(6, 4)
    with torch.no_grad():
        encoded = pipe.vae.encode(build.to_tensor(images)).latent_dist.mean
    late = build.denoised_latents(pipe, images, captions, seed=0, start=(0.96, 0.96), steps=25)
    early = build.denoised_latents(pipe, images, captions, seed=0, start=(0.2, 0.2), steps=25)
    assert late.shape == encoded.shape
    assert torch.equal(late, build.denoised_latents(pipe, images, captions, seed=0, start=(0.96, 0.96), steps=25))
    # one step from nearly clean keeps the render's latent; redrawn from far back, the denoiser's own
    gap = {name: (z - encoded).pow(2).mean().item() for name, z in (("late", late), ("early", early))}
    assert 0 < gap["late"] < 0.5 * gap["early"], gap


def test_class_maps_hold_each_objects_code_where_it_lies():
    _, masks, classes = codec_batch(6, 2, with_masks=True, with_classes=True)
    maps = build.class_maps(masks, classes)
    assert maps.shape == (6, 1, 16, 16)
    for m, mask, k in zip(maps[:, 0], masks, classes):
        inside = torch.from_numpy(mask.reshape(16, 4, 16, 4).all(axis=(1, 3)))   # latent pixels all object
        outside = torch.from_numpy(~mask.reshape(16, 4, 16, 4).any(axis=(1, 3)))
        assert inside.any() and torch.allclose(m[inside], build.CLASS_CODES[k].expand(int(inside.sum())))
        assert torch.all(m[outside] == 0)
    # the classes come from the same scenes as the images: asking for them changes nothing
    assert np.array_equal(codec_batch(6, 2), codec_batch(6, 2, with_classes=True)[0])


def test_the_denoisers_text_encoder_starts_as_the_metric_models_text_tower(quick_world):
    import open_clip
    from transformers import CLIPTextModel

    out, world = quick_world
    assert world["parts"]["denoiser"]["text_encoder"] == "metric"
    clip = open_clip.create_model(f"local-dir:{out / 'metric'}").eval()
    ids = build.tokenize(clip_tokenizer(), ["a red ball in the snow", "a sks star", ""])
    with torch.no_grad():
        theirs = clip.ln_final(clip.transformer(clip.token_embedding(ids) + clip.positional_embedding,
                                                attn_mask=clip.attn_mask))
        ours = models.text_encoder_from_metric(clip)(ids)[0]
        fresh = models.text_encoder()(ids)[0]    # the negative control: an untrained tower
        built = CLIPTextModel.from_pretrained(str(out / "text_encoder"))(ids)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(fresh, theirs, atol=1e-2)
    # the build started from the tower: a few quick steps later it is still near it
    assert (built - theirs).abs().mean() < 0.5 * (fresh - theirs).abs().mean()


def test_identifier_words_are_single_new_tokens():
    tokenizer = clip_tokenizer()
    words = build.identifier_words(tokenizer, 64)
    assert len(set(words)) == 64 and words == build.identifier_words(tokenizer, 64)
    assert all(len(tokenizer(w).input_ids) == 3 for w in words)
    concept_words = {w for c in CONCEPTS.values() for w in c["phrase"].split()}
    assert not concept_words & set(words)
    with pytest.raises(ValueError, match="one-token identifier words"):
        build.identifier_words(tokenizer, 10**6)


def test_a_named_instance_is_one_object_whatever_the_scene():
    names = ["bbb", "bbc", "bbl"]
    images, captions, masks = named_instance_batch(60, 0, names)
    looks = {}
    for image, text, mask in zip(images, captions, masks):
        name = next(n for n in names if f" {n} " in f" {text} ")
        k = names.index(name)
        cls = instance_class(k)
        assert f"{name} {cls}" in text and "sks" not in text
        # the object's colours (the renderer's +-6 noise aside) are the instance's own
        colours = np.unique((image[mask].astype(int) + 8) // 16, axis=0)
        looks.setdefault(name, []).append({tuple(c) for c in colours})
    assert set(looks) == set(names)
    for name, seen in looks.items():
        common = set.intersection(*seen)
        assert common, f"{name} has no colour common to all its images"
    # negative control: two instances do not share their look
    assert set.intersection(*looks["bbb"]) != set.intersection(*looks["bbc"])


def test_a_concept_folder_names_its_own_phrase(quick_world, tmp_path):
    """`generate --concept DIR` takes the phrase and superclass from the concept's own
    concept.json when the model has none (the world's pipeline folder has none)."""
    from personalize.runs.request import Request
    from personalize.runs.request import check as check_request

    out, _ = quick_world
    assert not (out / "concept.json").exists()
    prep = check_request(Request(prompt="a {} in the snow", model=str(out), concept=str(out / "concepts" / "star")))
    assert (prep.concept_phrase, prep.superclass) == ("sks star", "star")
    assert prep.prompts.concept == "a sks star in the snow"
    from personalize.runs.lab import Lab

    lab = Lab(str(out), concept=str(out / "concepts" / "star"), try_study_model=False)   # python app.py --concept
    assert (lab.default_concept.phrase, lab.default_concept.superclass) == ("sks star", "star")
    assert len(lab.default_concept.references) == 5
    assert all(str(out / "concepts" / "star") in r for r in lab.default_concept.references)
    bare = tmp_path / "bare"    # the same weights without their concept.json: nothing to take the phrase from
    shutil.copytree(out / "concepts" / "star", bare)
    (bare / "concept.json").unlink()
    with pytest.raises(UserError, match="--concept-phrase: not given, and neither the concept nor the model"):
        check_request(Request(prompt="a {} in the snow", model=str(out), concept=str(bare)))


def test_generate_on_a_world_without_a_concept_takes_the_worlds_own(quick_world, tmp_path, capsys):
    """`generate` on a world with neither --concept nor --concept-phrase uses the world's
    first concept, as the app does (the README's first command); a phrase given on the
    command line keeps the base model."""
    import json

    from personalize.cli import main

    out, _ = quick_world
    assert main(["generate", "--model", str(out), "--prompt", "a {} on the beach", "--steps", "2",
                 "--out", str(tmp_path / "own")]) == 0
    card = json.loads((tmp_path / "own" / "run.json").read_text())
    assert card["concept"]["path"] == str(out / "concepts" / "ball") and card["concept_phrase"] == "sks ball"
    assert "the world's own" in capsys.readouterr().err
    assert main(["generate", "--model", str(out), "--prompt", "a {} on the beach", "--steps", "2",
                 "--concept-phrase", "sks star", "--superclass", "star", "--out", str(tmp_path / "base")]) == 0
    assert json.loads((tmp_path / "base" / "run.json").read_text())["concept"] is None


def test_build_recipe_from_the_command_line(tmp_path, monkeypatch, capsys):
    from personalize.cli import main
    from personalize.cli import world as world_verb

    built = {}

    def fake_build(out, **kwargs):
        built.update(kwargs)
        return {"build_seconds": 0.0}

    monkeypatch.setattr(world_verb, "build_world", fake_build)
    assert main(["world", "build", "--out", str(tmp_path / "w"), "--recipe", "world6", "--no-check"]) == 0
    assert built["size"] is build.WORLD6 and built["size"].code_steps > 0 and built["size"].decoder_denoised > 0
    assert main(["world", "build", "--out", str(tmp_path / "w")]) == 0
    assert built["size"] is build.WORLD7 and build.WORLD7.continue_minutes > 0   # the shipped world's recipe by default
    assert main(["world", "build", "--out", str(tmp_path / "w"), "--recipe", "world8", "--no-check"]) == 0
    assert built["size"] is build.WORLD8 and build.WORLD8.concept_settings("ball")[2] == 16
    built.clear()
    assert main(["world", "build", "--out", str(tmp_path / "w"), "--recipe", "world6", "--quick"]) == 2
    assert "--quick builds its own tiny recipe" in capsys.readouterr().err and not built
    assert main(["world", "build", "--out", str(tmp_path / "w"), "--recipe", "world9"]) == 2
    assert "world9" in capsys.readouterr().err and not built


def test_a_recipe_can_give_one_concept_its_own_settings(tmp_path, monkeypatch):
    # World 8's recipe trains the ball harder than the star; the others keep the recipe's shared settings.
    calls = {}

    def fake_train(pipe, images, *, phrase, out, steps, lr, batch_size, **kwargs):
        calls[phrase] = (steps, lr, batch_size, len(images))
        return {"method": "svdiff", "steps": steps, "seconds": 0.0, "final_loss": 0.1}

    monkeypatch.setattr(build, "load_pipeline", lambda folder: object())
    monkeypatch.setattr(build, "train_concept", fake_train)
    size = dataclasses.replace(build.QUICK, concept_steps=4, concept_lr=5e-3, concept_batch=1,
                               concept_by_name=(("ball", 7, 1e-2, 16),))
    record = build.train_concepts(tmp_path, size, seed=0, log=lambda message: None)
    assert calls == {"sks star": (4, 5e-3, 1, 5), "sks ball": (7, 1e-2, 16, 5)}
    assert record["ball"]["batch"] == 16 and record["star"]["lr"] == 5e-3
    assert build.WORLD8.concept_by_name == (("ball", 1_500, 1e-2, 16),)
    # A bad row fails when the recipe is made, not when the build reaches its concepts.
    with pytest.raises(ValueError, match=r"\('dog', 1, 0\.001, 1\) is not"):
        dataclasses.replace(size, concept_by_name=(("dog", 1, 1e-3, 1),))
    with pytest.raises(ValueError, match=r"\('ball', 1, 0\.001\) is not"):
        dataclasses.replace(size, concept_by_name=(("ball", 1, 1e-3),))
    with pytest.raises(ValueError, match="'ball' has more than one row"):
        dataclasses.replace(size, concept_by_name=(("ball", 1, 1e-3, 1), ("ball", 2, 1e-3, 1)))
