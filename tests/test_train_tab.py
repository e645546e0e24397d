"""The Train tab's logic on the demo model: a short run becomes the session's concept and
the next Explore run uses it; Stop ends a run with a usable concept; bad input is one
clear error and writes nothing."""

import copy
import json
import pickle
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from personalize.concepts.files import detect_format  # noqa: E402
from personalize.errors import UserError  # noqa: E402
from personalize.runs.lab import Finished, Lab  # noqa: E402
from personalize.training.jobs import MAX_STEPS, Progress, Trained  # noqa: E402
from personalize.training.loop import weights_hash  # noqa: E402
from tests.test_training import SIZE, star_images  # noqa: E402
from ui.session import Session  # noqa: E402
from ui.train_tab import create_train, request_stop, train  # noqa: E402


@pytest.fixture(scope="module")
def lab(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "demo"
    pipe.save_pretrained(path)
    return Lab(str(path), try_study_model=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, image in enumerate(star_images(3)):
        image.save(folder / f"star_{i}.png")
        paths.append(str(folder / f"star_{i}.png"))
    return paths


def new_session(lab):
    return Session(copy.deepcopy(lab.default_concept))


def test_a_run_becomes_the_sessions_concept_and_explore_uses_it(lab, photos, tmp_path):
    session = new_session(lab)
    items = list(train(lab, session, photos, "sks star", "star", "lora", 3, resolution=SIZE, root=tmp_path))
    assert all(isinstance(i, Progress) for i in items[:-1]) and isinstance(items[-1], Trained)
    steps = [p.step for p in items[:-1]]
    assert steps and steps == sorted(set(steps)) and steps[-1] <= 3 and {p.steps for p in items[:-1]} == {3}
    done = items[-1]
    assert not done.summary["stopped"] and done.summary["steps"] == 3
    assert done.out.parent == tmp_path and detect_format(done.out) == "lora"
    concept = json.loads((done.out / "concept.json").read_text())
    assert (concept["method"], concept["phrase"], concept["superclass"]) == ("lora", "sks star", "star")
    assert session.concept.weights == str(done.out) and session.concept.phrase == "sks star"
    assert session.concept.superclass == "star"
    assert sorted(p.name for p in (done.out / "references").iterdir()) == ["star_0.png", "star_1.png", "star_2.png"]
    assert len(session.concept.references) == 3 and all(Path(p).is_file() for p in session.concept.references)

    # the next Explore run samples with the trained concept
    prep = lab.request(session.concept, "a photo of a {} on the beach", "concept", {}, steps=2, size=SIZE)
    finished = lab.generate(prep)
    assert isinstance(finished, Finished) and finished.card["concept"]["format"] == "lora"
    assert Path(finished.card["concept"]["path"]).resolve() == done.out.resolve()


def test_stop_ends_the_run_with_a_usable_concept(lab, photos, tmp_path, pipe):
    """Also: the run trains the base model, not the concept the previous test's Explore run
    left applied to the app's pipeline."""
    session = new_session(lab)
    request_stop(session)   # a Stop pressed before this run started does not stop it
    items = []
    for item in train(lab, session, photos, "sks star", "star", "svdiff", 50, resolution=SIZE, root=tmp_path):
        items.append(item)
        if isinstance(item, Progress):
            request_stop(session)
    pickle.loads(pickle.dumps(session))   # plain data: ZeroGPU pickles it into its worker
    done = items[-1]
    assert isinstance(done, Trained) and done.summary["stopped"]
    assert 1 <= done.summary["steps"] < 50 and done.summary["steps_planned"] == 50
    assert detect_format(done.out) == "svdiff" and session.concept.weights == str(done.out)
    assert done.summary["base_model"]["sha256"] == weights_hash(pipe)


@pytest.mark.parametrize("change,message", [
    (dict(photos=[]), "photos: 0 given; upload 3 to 20"),
    (dict(photos="two"), "photos: 2 given"),
    (dict(photos="text"), "notes.txt is not an image"),
    (dict(photos="fake"), "fake.png does not open as an image"),
    (dict(phrase="  "), "concept phrase: empty"),
    (dict(superclass=""), "superclass: empty"),
    (dict(method="textual-inversion", phrase="sks star"), "learns one new token"),
    (dict(method="textual-inversion", phrase="sks"), "already a single token"),
    (dict(method="hypernetwork"), "'hypernetwork' is not one of"),
    (dict(steps=0), f"steps: 0 must be a whole number from 1 to {MAX_STEPS}"),
    (dict(steps=MAX_STEPS + 1), "must be a whole number from 1"),
    (dict(steps=2.5), "must be a whole number"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(lab, photos, tmp_path, change, message):
    args = dict(photos=photos, phrase="sks star", superclass="star", method="lora", steps=2)
    args.update(change)
    if args["photos"] == "two":
        args["photos"] = photos[:2]
    elif args["photos"] in ("text", "fake"):
        bad = tmp_path / "bad"
        bad.mkdir()
        name = "notes.txt" if args["photos"] == "text" else "fake.png"
        (bad / name).write_text("not an image")
        args["photos"] = photos[:2] + [str(bad / name)]
    root = tmp_path / "concepts"
    session = new_session(lab)
    before = copy.deepcopy(session.concept)
    with pytest.raises(UserError, match=None) as info:
        list(train(lab, session, resolution=SIZE, root=root, **args))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not root.exists() or not any(root.iterdir())
    assert session.concept == before


def test_the_tab_builds_and_its_button_runs_the_training(lab, photos, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # where new_concept_folder writes by default
    with gr.Blocks() as demo:
        state = gr.State(new_session(lab))
        with gr.Tabs():
            tab = create_train(lab, state)
    assert {"photos", "phrase", "superclass", "method", "steps", "train", "stop", "status", "done"} <= set(tab)
    assert tab["method"].choices == [(m, m) for m in ("svdiff", "dreambooth", "lora", "textual-inversion")]
    run = next(f.fn for f in demo.fns.values() if f.name == "run")
    session = new_session(lab)
    outputs = list(run(session, photos, "<sks-star>", "star", "textual-inversion", 2))
    assert outputs[0][0].startswith("Step ")
    status, folder, returned = outputs[-1]
    assert status.startswith("Trained 2 of 2 steps") and returned is session
    assert detect_format(folder) == "textual_inversion" and session.concept.weights == folder
    with pytest.raises(gr.Error, match="already a single token"):
        list(run(session, photos, "sks", "star", "textual-inversion", 2))
