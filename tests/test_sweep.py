"""`sweep`: rows and files, resume after a crash, two processes under accelerate, and
bad configs refused before any image."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from personalize.cli import main
from personalize.errors import UserError
from personalize.evaluation.prompt_sets import DREAMBENCH_LIVE, DREAMBENCH_OBJECT
from personalize.evaluation.sweep import COLUMNS, KEY, PARTS, RESULTS, TIMING, read_rows, run_sweep
from personalize.evaluation.sweep_config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


PROMPTS = ["a {} in the jungle", "a red {}"]


def base_config(model) -> dict:
    """2 prompts x 2 sampler points x 1 seed = 4 jobs of 2 images, 64 px, 2 steps."""
    return {"model": str(model), "concepts": [{"name": "demo"}], "prompts": list(PROMPTS), "seeds": [0],
            "steps": 2, "height": 64, "width": 64, "images_per_prompt": 2,
            "samplers": [{"name": "concept", "points": [{"w": 7}]},
                         {"name": "mixed", "grid": {"w_s": [3.5], "w_c": [3.5]}}]}


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def comparable(rows):
    """Rows by key, without the timing columns."""
    return {tuple(r[k] for k in KEY): {c: r[c] for c in COLUMNS if c not in TIMING} for r in rows}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model with two small reference images, written under one thread (the
    session's `demo_dir` would be made before this module's thread setting)."""
    from personalize.models.demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "model", references=2, steps=2)


@pytest.fixture(scope="module")
def config_file(demo, tmp_path_factory):
    return write(tmp_path_factory.mktemp("sweep") / "sweep.yaml", base_config(demo))


@pytest.fixture(scope="module")
def baseline(config_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "out"
    summary = run_sweep(load_config(config_file), out, progress=False)
    return out, summary, read_rows(out / RESULTS)


def test_rows_and_files(baseline):
    out, summary, rows = baseline
    assert summary.images == 8 and summary.rows == 8 and len(rows) == 8
    assert list(rows[0]) == list(COLUMNS)
    assert len(comparable(rows)) == 8                      # one row per key
    assert not list((out / PARTS).glob("*.csv"))            # merged, parts removed
    assert {r["prompt"] for r in rows} == set(PROMPTS)
    for r in rows:
        assert (out / r["image_path"]).is_file()
        for column in ("is", "ts", "ts_class", "dino"):
            assert -1.0001 <= float(r[column]) <= 1.0001
        assert r["random_weights"] == "true" and "RANDOM" in r["metric_models"]
        assert r["ts_prompt"] == r["prompt"].replace("{} ", "").replace(" {}", "")
        assert r["ts_class_prompt"] == r["prompt"].replace("{}", "dog")
    # denoiser rows per image over 2 steps: concept 2 per step, mixed 3
    rows_of = {(r["sampler"], r["point"], r["params"]): int(r["rows"]) for r in rows}
    assert rows_of == {("concept", "w=7.0", '{"w": 7.0}'): 4,
                       ("mixed", "w_c=3.5,w_s=3.5", '{"w_c": 3.5, "w_s": 3.5}'): 6}


def test_killed_sweep_resumes_to_the_same_rows(config_file, baseline, tmp_path):
    out = tmp_path / "out"
    config = load_config(config_file)
    with pytest.raises(RuntimeError, match="fail_after"):
        run_sweep(config, out, progress=False, fail_after=5)  # dies in its third job
    (part,) = (out / PARTS).glob("*.csv")
    before = read_rows(part)
    assert len(before) == 4 and not (out / RESULTS).exists()  # two jobs kept, the one in flight lost

    summary = run_sweep(config, out, progress=False)
    assert summary.images == 4                                 # only the missing rows
    rows = read_rows(out / RESULTS)
    assert comparable(rows) == comparable(baseline[2])
    seconds = {tuple(r[k] for k in KEY): r["seconds"] for r in rows}
    assert all(seconds[tuple(r[k] for k in KEY)] == r["seconds"] for r in before)  # not recomputed

    assert run_sweep(config, out, progress=False).images == 0  # nothing left to do


def test_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "part.csv"
    path.write_text("concept,prompt\ndemo,a {} in the snow\ndemo,a {} in th")
    assert read_rows(path) == [{"concept": "demo", "prompt": "a {} in the snow"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_rows(config_file, baseline, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "-m", "personalize", "sweep", str(config_file), "--out", str(out), "--device", "cpu", "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_rows(out / RESULTS)
    assert len(rows) == 8 and not list((out / PARTS).glob("*.csv"))
    ours, theirs = comparable(rows), comparable(baseline[2])
    assert ours.keys() == theirs.keys()
    for key, row in ours.items():  # one process per core vs two threads: float noise only
        for column, value in row.items():
            if column in ("is", "ts", "ts_class", "dino"):
                assert float(value) == pytest.approx(float(theirs[key][column]), abs=1e-4)
            else:
                assert value == theirs[key][column], column
        a = np.asarray(Image.open(out / row["image_path"]), dtype=int)
        b = np.asarray(Image.open(baseline[0] / row["image_path"]), dtype=int)
        assert np.abs(a - b).max() <= 2


def test_changed_settings_are_refused(demo, baseline, tmp_path, capsys):
    config = base_config(demo) | {"steps": 3}
    assert main(["sweep", str(write(tmp_path / "c.yaml", config)), "--out", str(baseline[0])]) == 2
    assert "was made with steps = 2" in capsys.readouterr().err


def test_dry_run_counts(config_file, baseline, capsys):
    assert main(["sweep", str(config_file), "--out", str(baseline[0]), "--dry-run"]) == 0
    assert "8 images, 0 still to compute" in capsys.readouterr().out


def mutate(config, path, value):
    """config with the key at `path` (a list of keys and indices) set to `value`."""
    node = config
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return config


@pytest.mark.parametrize("path, value, message", [
    (["prompts"], "dreambench-animals", "unknown prompt set 'dreambench-animals'"),
    (["prompts"], [], "prompts: the list of prompt templates is empty"),
    (["prompts"], ["a dog in the snow"], "has no placeholder"),
    (["samplers", 0, "name"], "fancy", "unknown sampler 'fancy'"),
    (["concepts", 0, "references"], ["missing.png"], "missing.png does not exist"),
    (["samplers", 1, "grid"], {"w_s": []}, "no values for w_s"),
    (["samplers", 1, "grid"], {}, "the grid is empty"),
    (["samplers", 0, "points"], [], "samplers[0] (concept).points: the list is empty"),
    (["samplers"], [], "samplers: the list is empty"),
    (["seeds"], [], "seeds: the list is empty"),
    (["step"], 2, "unknown key 'step'"),
    (["concepts", 0, "phrse"], "sks dog", "concepts[0]: unknown key 'phrse'"),
    (["samplers", 0, "points"], [{"w_x": 1}], "unknown key 'w_x'"),
    (["samplers", 1, "grid"], {"w_x": [1]}, "unknown parameter 'w_x'"),
    (["samplers", 0, "points"], [{"w": "high"}], "parameter w: 'high' is not a number"),
    (["samplers", 1, "name"], "switching", "unknown parameter 'w_c' for sampler 'switching'"),
    (["metrics"], {"dino": "dinov3"}, "metrics.dino"),
    (["metrics"], {"clipp": "openai"}, "metrics: unknown key 'clipp'"),
    (["device"], "tpu", "--device"),
])
def test_bad_config_is_refused_before_any_image(demo, tmp_path, capsys, path, value, message):
    config = mutate(base_config(demo), path, value)
    out = tmp_path / "out"
    assert main(["sweep", str(write(tmp_path / "bad.yaml", config)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_reference_file(demo, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    config = mutate(base_config(demo), ["concepts", 0, "references"], ["notes.png"])
    with pytest.raises(UserError, match="not a readable image"):
        parse_config(config, base=tmp_path)


def test_dreambench_concepts_from_the_dataset_folder(demo, tmp_path):
    for subject in ("dog", "can"):
        (tmp_path / "data" / subject).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / subject / "00.jpg")
    config = base_config(demo) | {"prompts": "dreambench"}
    config["concepts"] = [{"dreambench": "data", "subjects": ["dog", "can"], "weights": "ckpt/{name}"}]
    dog, can = parse_config(config, base=tmp_path).concepts
    assert (dog.name, dog.phrase, dog.superclass, dog.weights) == ("dog", "sks dog", "dog", "ckpt/dog")
    assert (can.phrase, can.superclass) == ("sks can", "can")
    assert list(dog.prompts) == DREAMBENCH_LIVE and list(can.prompts) == DREAMBENCH_OBJECT
    config["concepts"][0]["subjects"] = ["dog", "unicorn"]
    with pytest.raises(UserError, match="unknown subject 'unicorn'"):
        parse_config(config, base=tmp_path)


def readme_yaml(name: str) -> dict:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"```yaml\n# {name}\n") + len("```yaml\n")
    return yaml.safe_load(text[start:text.index("```", start)])


def test_readme_configs_parse(demo, tmp_path):
    from personalize.evaluation.prompt_sets import SUBJECTS

    study = readme_yaml("study.yaml")
    for subject in SUBJECTS:
        (tmp_path / "data" / subject).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / subject / "00.jpg")
    study["concepts"][0]["dreambench"] = str(tmp_path / "data")
    config = parse_config(study, base=tmp_path)
    assert len(config.concepts) == 30 and all(len(c.prompts) == 25 for c in config.concepts)
    assert len(config.points) == 1 + 1 + 9 + 8 + 9 + 4 + 9 + 3
    assert (config.steps, config.images_per_prompt, config.scheduler) == (50, 10, "ddim")
    config = parse_config(readme_yaml("try.yaml") | {"model": str(demo)}, base=tmp_path)
    assert [c.phrase for c in config.concepts] == ["sks dog"] and len(config.points) == 5


@pytest.mark.parametrize("sampler", ["mixed", "masked", "profusion", "photoswap"])
def test_batched_loop_equals_one_run_per_item(demo, sampler):
    """The sweep's batched loop gives each (prompt, seed) the images and row count of its
    own `engine.run`, whatever shares its batch."""
    from personalize.models.loading import load_pipeline
    from personalize.prompts import prompt_pair
    from personalize.sampling.batched import Item, run_many
    from personalize.sampling.engine import run
    from personalize.sampling.samplers import configure

    pipe = load_pipeline(str(demo))
    config = configure(sampler, {}, 3)
    items = [Item(prompt_pair(t, "sks dog", "dog"), seed) for t in PROMPTS for seed in (0, 1)]
    batched = run_many(pipe, items, config, num_images=2, height=64, width=64, concept_phrase="sks dog")
    for item, got in zip(items, batched):
        one = run(pipe, item.prompts, config, seed=item.seed, num_images=2, height=64, width=64,
                  concept_phrase="sks dog")
        assert got.rows == one.rows
        for a, b in zip(got.images, one.images):
            assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2


def test_batches_are_fixed_by_the_grid(demo):
    from personalize.evaluation.sweep import batches_of

    config = parse_config(dict(base_config(demo), batch_images=3), base=demo.parent)
    batches = batches_of(config)
    assert [len(b) for b in batches] == [1, 1, 1, 1]      # 2 images per job: one job per batch of 3
    assert all(len({(j.concept.name, j.point) for j in b}) == 1 for b in batches)
    config = parse_config(base_config(demo), base=demo.parent)
    assert [len(b) for b in batches_of(config)] == [2, 2]  # one batch per sampler point


def test_world_prompt_set_is_the_worlds():
    from personalize.evaluation.prompt_sets import WORLD
    from personalize.world.scene import WORLD_PROMPTS

    assert WORLD == list(WORLD_PROMPTS)
