"""The metrics: IS / TS / DINO formulas by hand on tiny tensors, preprocessing, and the
metric models (offline here: seeded random weights, labelled)."""

import math

import pytest
import numpy as np
import torch
from PIL import Image

from personalize.errors import UserError
from personalize.evaluation.metrics import (CLIP_MEAN, MetricSettings, _load_or_random, clip_transform, dino_transform,
                                 image_scores, image_similarity, load_metric_models, per_image_similarity,
                                 text_similarity)


def cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.fixture
def tiny():
    g = torch.Generator().manual_seed(0)
    return {"refs": torch.randn(3, 5, generator=g), "gen": torch.randn(4, 5, generator=g),
            "text": torch.randn(5, generator=g), "text_class": torch.randn(5, generator=g),
            "dref": torch.randn(3, 7, generator=g), "dgen": torch.randn(4, 7, generator=g)}


def test_is_is_the_mean_of_the_full_cosine_matrix(tiny):
    refs, gen = tiny["refs"].tolist(), tiny["gen"].tolist()
    by_hand = sum(cos(r, g) for r in refs for g in gen) / (len(refs) * len(gen))
    assert image_similarity(tiny["refs"], tiny["gen"]) == pytest.approx(by_hand, abs=1e-6)
    per_image = per_image_similarity(tiny["refs"], tiny["gen"])
    assert per_image.tolist() == pytest.approx([sum(cos(r, g) for r in refs) / 3 for g in gen], abs=1e-6)
    assert float(per_image.mean()) == pytest.approx(by_hand, abs=1e-6)  # rows per image give the same IS


def test_ts_is_the_cosine_with_the_prompt(tiny):
    by_hand = [cos(g, tiny["text"].tolist()) for g in tiny["gen"].tolist()]
    assert text_similarity(tiny["text"], tiny["gen"]).tolist() == pytest.approx(by_hand, abs=1e-6)
    # scale does not matter: cosines of unnormalised and normalised embeddings agree
    assert text_similarity(3 * tiny["text"], 0.5 * tiny["gen"]).tolist() == pytest.approx(by_hand, abs=1e-6)


def test_image_scores_by_hand(tiny):
    s = image_scores(tiny["gen"], tiny["refs"], tiny["text"], tiny["text_class"], tiny["dgen"], tiny["dref"])
    gen = tiny["gen"].tolist()
    for k, g in enumerate(gen):
        assert s["is"][k] == pytest.approx(sum(cos(r, g) for r in tiny["refs"].tolist()) / 3, abs=1e-6)
        assert s["ts"][k] == pytest.approx(cos(g, tiny["text"].tolist()), abs=1e-6)
        assert s["ts_class"][k] == pytest.approx(cos(g, tiny["text_class"].tolist()), abs=1e-6)
        d = tiny["dgen"][k].tolist()
        assert s["dino"][k] == pytest.approx(sum(cos(r, d) for r in tiny["dref"].tolist()) / 3, abs=1e-6)
    assert "dino" not in image_scores(tiny["gen"], tiny["refs"], tiny["text"], tiny["text_class"])


def test_preprocessing():
    image = Image.new("RGB", (320, 160), (255, 0, 0))
    x = clip_transform()(image)
    assert x.shape == (3, 224, 224)
    assert float(x[0, 0, 0]) == pytest.approx((1 - CLIP_MEAN[0]) / 0.26862954, abs=1e-4)
    y = dino_transform()(image)
    assert y.shape == (3, 224, 224)
    assert float(y[0, 0, 0]) == pytest.approx((1 - 0.485) / 0.229, abs=1e-4)  # ImageNet mean/std
    resize, crop = dino_transform().transforms[:2]
    assert (resize.size, crop.size, resize.interpolation.value) == (256, (224, 224), "bicubic")


def test_settings_are_checked(tmp_path):
    with pytest.raises(UserError, match="metrics.dino"):
        MetricSettings(dino="dinov3").check()
    with pytest.raises(UserError, match="does not exist"):
        MetricSettings(clip=str(tmp_path / "missing.bin")).check()


@pytest.fixture(scope="module")
def models():
    return load_metric_models(MetricSettings())


def test_offline_models_are_random_and_labelled(models):
    # HF_HUB_OFFLINE=1 (conftest): no weights can be had, so both models are random
    assert models.random_weights and set(models.random) == {"clip", "dino"}
    assert "RANDOM" in models.describe()
    assert load_metric_models(MetricSettings()) is models  # loaded once per process


def test_model_embeddings_feed_the_same_formulas(models):
    images = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    refs, gen = models.clip_images(images[:2]), models.clip_images(images[1:])
    assert refs.shape == (2, 512) and torch.allclose(refs.norm(dim=-1), torch.ones(2), atol=1e-5)
    texts = models.clip_texts(["a in the snow", "a dog in the snow"])
    assert texts.shape == (2, 512)
    dino = models.dino_images(images)
    assert dino.shape == (3, 384)
    s = image_scores(gen, refs, texts[0], texts[1], dino[1:], dino[:2])
    assert s["is"][0] == pytest.approx(float((gen[0] @ refs.T).mean()), abs=1e-6)
    assert s["ts"][1] == pytest.approx(float(gen[1] @ texts[0]), abs=1e-6)


def test_no_random_fallback_when_refused():
    with pytest.raises(UserError, match="allow_random"):
        load_metric_models(MetricSettings(dino="none", allow_random=False))


def fail():
    raise OSError("offline")


def test_fallback_rules(capsys):
    """Hub weights that cannot be had: seeded random weights, labelled (label None); a
    checkpoint file the user named must load; no fallback when refused."""
    model, label = _load_or_random("CLIP", "openai", True, fail, lambda: torch.nn.Linear(2, 2))
    again, _ = _load_or_random("CLIP", "openai", True, fail, lambda: torch.nn.Linear(2, 2))
    assert label is None and torch.equal(model.weight, again.weight)  # same weights in every process
    assert "RANDOM" in capsys.readouterr().err
    assert _load_or_random("DINO", "/w/dino.pth", True, lambda: "loaded", fail) == ("loaded", "/w/dino.pth")
    with pytest.raises(UserError, match="could not load the DINO weights /w/dino.pth"):
        _load_or_random("DINO", "/w/dino.pth", True, fail, fail)
    with pytest.raises(UserError, match="allow_random"):
        _load_or_random("CLIP", "openai", False, fail, fail)


@pytest.fixture(scope="module")
def world_metric(tmp_path_factory):
    """A metric model in the world's layout, written by the world builder's own saver
    (untrained: loading and preprocessing are what is tested here)."""
    from personalize.world.build import save_metric_model
    from personalize.world.models import metric_model

    folder = tmp_path_factory.mktemp("world") / "metric"
    torch.manual_seed(0)
    save_metric_model(metric_model(), folder)
    return folder


def test_world_metric_model_loads_through_the_metrics_code(world_metric):
    """The metrics code's folder loader against open_clip's own `local-dir:` loader with
    the preprocessing written out (the world is 64 px: no resize, no crop)."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    models = load_metric_models(MetricSettings(clip=str(world_metric), dino="none"))
    assert not models.random_weights and "open_clip folder" in models.describe() and "dino=none" in models.describe()
    resize, crop = models.clip_pre.transforms[:2]
    assert (resize.size, crop.size) == (64, (64, 64))          # the world's 64 px, not 224
    images = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 200, 30))]
    reference = open_clip.create_model(f"local-dir:{world_metric}").eval()
    x = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 255 for im in images])
    x = (x - torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs = torch.nn.functional.normalize(reference.encode_image(x), dim=-1)
        texts = ["a in the snow", "a red star"]
        their_texts = torch.nn.functional.normalize(
            reference.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts)), dim=-1)
    ours = models.clip_images(images)
    assert ours.shape == (2, 64) and torch.allclose(ours, theirs, atol=1e-4)
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)     # the two colours embed apart
    assert torch.allclose(models.clip_texts(texts), their_texts, atol=1e-5)


def test_clip_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="open_clip_config.json"):
        MetricSettings(clip=str(tmp_path)).check()
