"""The world's judge reads renders back from pixels: exact on clean renders, robust to
noise and blur, and it says no where it should."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from personalize.world import judge as J
from personalize.world import scene as W


def _scenes(n, seed):
    rng = np.random.default_rng(seed)
    scenes = []
    for ctx in W.CONTEXTS:  # every context x class x colour, and both concepts everywhere
        for cls in W.CLASSES:
            for col in W.COLOURS:
                scenes.append(W.random_scene(rng, cls=cls, colour=col, context=ctx))
        for c in W.CONCEPTS:
            scenes.append(W.random_scene(rng, concept=c, context=ctx))
    while len(scenes) < n:
        scenes.append(W.random_scene(rng, concept=[None, "star", "ball"][rng.choice(3, p=[0.8, 0.1, 0.1])]))
    return scenes[:n] if n >= 260 else list(rng.permutation(np.array(scenes, dtype=object))[:n])


def _agreement(scenes, images):
    ok = {"context": 0, "cls": 0, "colour": 0, "concept": 0}
    for s, a in zip(scenes, images):
        r = J.read_image(a)
        got_concept = next((k for k, v in r["is_concept"].items() if v), None)
        ok["context"] += r["context"] == s.context
        ok["cls"] += r["cls"] == s.cls
        ok["colour"] += r["colour"] == s.colour
        ok["concept"] += got_concept == s.concept
    return {k: v / len(scenes) for k, v in ok.items()}


def test_clean_renders_read_exactly():
    scenes = _scenes(1000, 0)
    agree = _agreement(scenes, W.render_batch(scenes))
    assert agree == {"context": 1.0, "cls": 1.0, "colour": 1.0, "concept": 1.0}, agree


@pytest.mark.parametrize("kind", ["noise", "blur"])
def test_noisy_and_blurred_renders(kind):
    scenes = _scenes(300, 1 if kind == "noise" else 2)
    rng = np.random.default_rng(3)
    images = []
    for a in W.render_batch(scenes):
        if kind == "noise":
            images.append(np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8))
        else:
            images.append(Image.fromarray(a).filter(ImageFilter.GaussianBlur(1)))
    agree = _agreement(scenes, images)
    assert min(agree.values()) >= 0.97, agree


def test_any_size_and_float_input():
    s = W.random_scene(np.random.default_rng(4), cls="star", colour="green", context="beach")
    a = W.render(s)
    big = Image.fromarray(a).resize((256, 256), Image.NEAREST)
    for img in (big, np.asarray(big), a.astype(np.float32) / 255.0):
        r = J.read_image(img)
        assert (r["context"], r["cls"], r["colour"]) == ("beach", "star", "green")


def test_judge_verdicts_and_negative_controls():
    rng = np.random.default_rng(5)
    star = W.render(W.random_scene(rng, concept="star", context="snow"))
    v = J.judge(star, "a sks star in the snow")
    assert v.concept is True and v.context_ok and v.class_ok and v.colour_ok is None
    assert v.is_concept == {"star": True, "ball": False}
    # a wrong context prompt
    v = J.judge(star, "a sks star on the beach")
    assert v.context_ok is False and v.concept is True
    # a concept prompt on a plain-class render (also a blue or black-and-white-free ball)
    for cls in W.CLASSES:
        for col in W.COLOURS:
            img = W.render(W.random_scene(rng, cls=cls, colour=col, context="plain"))
            phrase = W.CONCEPTS["star"]["phrase"] if cls != "ball" else W.CONCEPTS["ball"]["phrase"]
            v = J.judge(img, f"a {phrase}")
            assert v.concept is False and v.context_ok
    # the other concept is not this one
    ball = W.render(W.random_scene(rng, concept="ball", context="city"))
    assert J.judge(ball, "a sks star with a city in the background").concept is False
    assert J.judge(ball, "a sks ball with a city in the background").concept is True
    # colour prompts
    red = W.render(W.random_scene(rng, cls="box", colour="red", context="plain"))
    assert J.judge(red, "a red box").colour_ok is True
    v = J.judge(red, "a blue box")
    assert v.colour_ok is False and v.class_ok
    assert J.judge(red, "a red ball").class_ok is False
    assert J.judge(star, "a red sks star").colour_ok is False


def test_fidelity():
    rng = np.random.default_rng(6)
    vs = []
    for ctx in ["jungle", "snow", "city", "mountain"]:
        img = W.render(W.random_scene(rng, concept="star", context=ctx))
        vs.append(J.judge(img, W.fill("a {} in the jungle", "sks star")))
    img = W.render(W.random_scene(rng, cls="star", colour="red", context="plain"))
    vs.append(J.judge(img, W.fill("a red {}", "sks star")))
    f = J.fidelity(vs)
    assert f["n"] == 5 and f["n_concept"] == 5
    assert f["concept_fidelity"] == pytest.approx(4 / 5)
    assert f["context_fidelity"] == pytest.approx(2 / 5)  # one jungle context_ok, one red colour_ok
    assert J.fidelity([])["concept_fidelity"] is None


def test_parse_prompt():
    P = J.parse_prompt
    assert P("a photo of a red ball in the snow") == {"cls": "ball", "colour": "red", "context": "snow",
                                                      "concept": None}
    assert P("a red ball in the snow") == P("a photo of a red ball in the snow")
    assert P("a box") == {"cls": "box", "colour": None, "context": "plain", "concept": None}
    assert P("a red sks star") == {"cls": "star", "colour": "red", "context": "plain", "concept": "star"}
    assert P("an orange pyramid")["colour"] == "orange"
    assert P("A sks ball with a blue house in the background.")["context"] == "blue house"
    for t in W.WORLD_PROMPTS:
        for c, d in W.CONCEPTS.items():
            p = P(W.fill(t, d["phrase"]))
            assert p["concept"] == c and p["cls"] == d["superclass"]
    assert P("a V* star in the snow", {"star": "V* star"})["concept"] == "star"
    for bad in ["a cube", "a red ball in space", "a shiny sks star", "red ball", "", "a sks dog"]:
        with pytest.raises(ValueError, match="world prompt"):
            P(bad)
