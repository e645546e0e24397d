"""`personalize train` (the verb module), resume / stop, bad inputs, the training bench."""

import argparse
import json
import threading

import pytest
import torch
from safetensors.torch import load_file

from personalize.concepts import apply_concept
from personalize.errors import UserError
from personalize.cli import train as cli
from personalize.training import train_concept
from personalize.training.bench import training_bench
from tests.test_training import SIZE, star_images


@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "demo"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("images")
    for i, image in enumerate(star_images(2)):
        image.save(path / f"star_{i}.png")
    return path


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def base_args(model_dir, images_dir, out, *extra):
    return parse("--model", str(model_dir), "--images", str(images_dir), "--phrase", "sks star",
                 "--superclass", "star", "--resolution", str(SIZE), "--out", str(out), *extra)


def test_cli_trains_a_lora_concept(model_dir, images_dir, tmp_path, capsys):
    out = tmp_path / "c"
    assert cli.command(base_args(model_dir, images_dir, out, "--method", "lora", "--steps", "2")) == 0
    printed = capsys.readouterr()
    for default in ("lr", "max_grad_norm", "rank", "weight_decay", "resolution", "seed"):
        assert default in printed.out
    assert "trained 2 steps" in printed.out
    concept = json.loads((out / "concept.json").read_text())
    assert concept["method"] == "lora" and concept["steps"] == 2
    assert concept["base_model"]["name"] == str(model_dir)
    assert [r.startswith("references/") for r in concept["references"]] == [True, True]


def _write_text_file(folder):
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.mark.parametrize("case, extra, match", [
    ("empty folder", None, "is empty"),
    ("not an image", None, "is not an image"),
    ("empty phrase", ("--phrase", " "), "--phrase: must not be empty"),
    ("existing token", ("--method", "textual-inversion", "--phrase", "sks"), "already a single token"),
    ("zero steps", ("--steps", "0"), "--steps: 0 must be > 0"),
    ("unknown method", ("--method", "hypernetwork"), "--method: 'hypernetwork' is not one of"),
    ("resume without checkpoint", ("--resume",), "no checkpoint"),
    ("bad resolution", ("--resolution", "60"), "--resolution: 60 must be a positive multiple"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(model_dir, images_dir, tmp_path, case, extra, match):
    images = images_dir
    if case == "empty folder":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "not an image":
        images = _write_text_file(tmp_path / "mixed")
    out = tmp_path / "out"
    args = base_args(model_dir, images, out, *(extra or ()))
    with pytest.raises(UserError, match=match) as info:
        cli.command(args)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_cli_refuses_a_non_empty_out_unless_overwrite(model_dir, images_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="is not empty"):
        cli.command(base_args(model_dir, images_dir, out, "--steps", "1"))
    with pytest.raises(UserError, match="also holds mine.txt"):
        cli.command(base_args(model_dir, images_dir, out, "--steps", "1", "--overwrite"))
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_train_concept_bad_inputs(pipe, tmp_path):
    out = tmp_path / "out"
    cases = [(dict(images=[]), "no images"), (dict(images=["x.png"]), "not a PIL image"),
             (dict(steps=-1), "--steps"), (dict(phrase=""), "--phrase"), (dict(lr=0), "--lr"),
             (dict(method="dreambooth", batch_size=0), "--batch-size"),
             (dict(prior_preservation=True, class_images=0), "--class-images")]
    for change, match in cases:
        kwargs = dict(images=star_images(1), phrase="sks star", superclass="star", out=out, resolution=SIZE)
        kwargs.update(change)
        with pytest.raises(UserError, match=match):
            train_concept(pipe, kwargs.pop("images"), **kwargs)
        assert not out.exists()


def test_stop_then_resume_equals_an_uninterrupted_run(pipe, tmp_path):
    common = dict(phrase="sks star", superclass="star", method="svdiff", steps=4, resolution=SIZE,
                  checkpoint_every=2, seed=3)
    whole = train_concept(pipe, star_images(2), out=tmp_path / "whole", **common)
    stop = threading.Event()

    def stop_at_3(info):
        if info["step"] == 3:
            stop.set()

    part = train_concept(pipe, star_images(2), out=tmp_path / "part", progress=stop_at_3, stop=stop, **common)
    assert part["stopped"] and part["steps"] == 3
    checkpoints = sorted(p.name for p in (tmp_path / "part" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-2", "checkpoint-3"]
    # the stopped run's folder and its checkpoints load as concepts
    for folder in (tmp_path / "part", tmp_path / "part" / "checkpoints" / "checkpoint-2"):
        apply_concept(pipe, folder).remove()
    resumed = train_concept(pipe, star_images(2), out=tmp_path / "part", resume=True, **common)
    assert resumed["steps"] == 4 and not resumed["stopped"]
    for name in ("spectral_shifts.safetensors", "spectral_shifts_te.safetensors"):
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "part" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["probe_loss_end"] == whole["probe_loss_end"]
    with pytest.raises(UserError, match="trained with seed=3"):
        train_concept(pipe, star_images(2), out=tmp_path / "part", resume=True, **dict(common, seed=4))


def test_training_bench(pipe):
    rows = training_bench(pipe, ["lora", "textual-inversion"], steps=2, resolution=SIZE)
    assert [r["method"] for r in rows] == ["lora", "textual-inversion"]
    assert all(r["seconds_per_step"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
