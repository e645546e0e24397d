"""The app's library side: streamed runs that stop, scores, the session chart, concepts."""

import threading

import pytest

from personalize.sampling.engine import Stopped
from personalize.errors import UserError
from personalize.runs.lab import Finished, Lab, StepUpdate, session_rows


@pytest.fixture(scope="module")
def lab(demo_dir):
    return Lab(str(demo_dir), try_study_model=False)


def test_demo_folder_is_said_plainly(lab):
    assert lab.demo and "offline demo model" in lab.banner()


def test_stream_yields_every_step_then_the_result(lab):
    prep = lab.request(lab.default_concept, "a {} in the snow", "masked", {"t_sw": 2}, steps=5, size=64)
    items = list(lab.stream(prep))
    updates = [i for i in items if isinstance(i, StepUpdate)]
    assert [u.step for u in updates] == list(range(5))
    assert updates[0].attention is None and updates[-1].attention is not None and updates[-1].mask is not None
    assert isinstance(items[-1], Finished) and len(items[-1].images) == 1


def alive_runs():
    return [t for t in threading.enumerate() if t.name == "personalize-run"]


def test_stop_really_stops(lab):
    prep = lab.request(lab.default_concept, "a {} in the snow", "mixed", {}, steps=40, size=64)
    stop = threading.Event()
    seen = []
    with pytest.raises(Stopped, match="stopped at step"):
        for item in lab.stream(prep, stop):
            seen.append(item)
            if len(seen) == 2:
                stop.set()
    assert len(seen) < 40 and not alive_runs()


def test_closing_the_stream_frees_the_worker(lab):
    prep = lab.request(lab.default_concept, "a {} in the snow", "mixed", {}, steps=40, size=64)
    stream = lab.stream(prep)
    next(stream)
    stream.close()  # what a UI's cancel does
    assert not alive_runs()


def test_score_and_chart(lab):
    prep = lab.request(lab.default_concept, "a {} in the snow", "concept", {}, steps=3, size=64)
    finished = lab.generate(prep)
    card = lab.score(lab.default_concept, finished.images, finished.card)
    assert -1 <= card["is"] <= 1 and -1 <= card["ts"] <= 1 and card["metrics_random"] is True
    rows = session_rows([card, card])
    assert len(rows) == 2 and rows[0]["params"] != rows[1]["params"]  # two runs, two points
    fig = lab.chart([card, card])
    xs = [x for trace in fig.data for x in trace.x]
    assert card["ts"] in xs


def test_make_concept_checks_input(lab, tmp_path):
    with pytest.raises(UserError, match="concept phrase: empty"):
        lab.make_concept("", "dog")
    with pytest.raises(UserError, match="superclass: empty"):
        lab.make_concept("sks dog", " ")
    bad = tmp_path / "weights.ckpt"
    bad.write_bytes(b"x")
    with pytest.raises(UserError, match="only .safetensors"):
        lab.make_concept("sks dog", "dog", upload=str(bad))
    not_image = tmp_path / "ref.png"
    not_image.write_text("hello")
    with pytest.raises(UserError, match="not an image"):
        lab.make_concept("sks dog", "dog", references=[str(not_image)])
    concept = lab.make_concept("sks cat", "cat")
    assert concept.phrase == "sks cat" and concept.references == lab.default_concept.references


def test_uploaded_concept_is_used_by_the_run(lab, tmp_path):
    """A textual-inversion upload becomes the session's concept, and its run applies it."""
    import torch
    from safetensors.torch import save_file

    file = tmp_path / "learned_embeds.safetensors"
    save_file({"<my-toy>": torch.randn(1, 64, generator=torch.Generator().manual_seed(3))}, str(file))
    concept = lab.make_concept("<my-toy>", "toy", upload=str(file))
    assert concept.weights == str(file)
    finished = lab.generate(lab.request(concept, "a photo of a {}", "mixed", {}, steps=2, size=64))
    assert finished.card["concept"]["format"] == "textual_inversion"
    assert finished.card["prompts"]["concept"] == "a photo of a <my-toy>"
    plain = lab.generate(lab.request(lab.default_concept, "a photo of a {}", "mixed", {}, steps=2, size=64))
    assert plain.card["concept"] is None


def test_scores_on_a_world_come_from_its_metric_model(quick_world):
    """The web API's scores (Lab.score) on a world: the world's own metric model, as the
    Explore tab's (Live.score); the demo lab above scores with random weights."""
    from personalize.runs.live import Live

    world = quick_world[0]
    lab = Lab(str(world))
    prep = lab.request(lab.default_concept, "a {} in the snow", "concept", {}, steps=2, size=64)
    finished = lab.generate(prep)
    card = lab.score(lab.default_concept, finished.images, finished.card)
    assert card["metrics_random"] is False and lab.world
    assert card["metrics"].startswith(f"clip=open_clip folder {world.name}/metric"), card["metrics"]
    shot = Live(lab).finish(lab.default_concept, finished.images, finished.card)
    assert (shot.card["is"], shot.card["ts"]) == pytest.approx((card["is"], card["ts"]))
