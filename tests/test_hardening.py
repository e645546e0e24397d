"""Issue 15, the library side: every bad request is refused with a clear message before
anything is built (no plan, no prompt, no model), and what is written stays valid JSON."""

import json
import math
import tracemalloc

import re

import pytest

from personalize.errors import UserError
from personalize.runs.lab import Lab
from personalize.runs.recording import compare_runs, parse_json_object
from personalize.runs.request import SEED_MAX, Limits, Request, check
from personalize.runs.runcard import write_run
from personalize.sampling.samplers import MAX_STEPS, SamplerConfig, configure, plan

PROMPT = "a photo of a {} on the beach"


@pytest.fixture(scope="module")
def lab(demo_dir):
    return Lab(str(demo_dir), try_study_model=False)


def refused(lab, message, **kwargs):
    args = dict(prompt=PROMPT, sampler="mixed", params={}, seed=0, steps=4)
    args.update(kwargs)
    with pytest.raises(UserError) as info:
        lab.request(lab.default_concept, args.pop("prompt"), args.pop("sampler"), args.pop("params"), **args)
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(steps=10 ** 9), "--steps: 1000000000 is outside [1, 150]"),
    (dict(steps=151), "outside [1, 150]"),
    (dict(steps=0), "outside [1, 150]"),
    (dict(steps=2.5), "not a whole number"),
    (dict(steps="many"), "not a whole number"),
    (dict(seed=2 ** 63), f"--seed: {2 ** 63} is outside [0, {SEED_MAX}]"),
    (dict(seed=10 ** 400), "a 401-digit number is outside"),
    (dict(seed=-1), "outside [0,"),
    (dict(seed=math.inf), "not a whole number"),
    (dict(seed=math.nan), "not a whole number"),
    (dict(seed="1e400"), "not a whole number"),
    (dict(num_images=9), "--num-images: 9 is outside [1, 8]"),
    (dict(size=4096), "--height: 4096 is outside [8, 1024]"),
    (dict(size=100), "must be a positive multiple of 8"),
    (dict(prompt="{}" * 100_000), "prompt: 200000 characters, over the limit of 1000"),
    (dict(negative_prompt="x" * 5000), "negative prompt: 5000 characters"),
    (dict(params={"w_c": 1e300}), "parameter w_c: 1e+300 is outside [0.0, 15.0]"),
    (dict(params={"w_s": -1.0}), "parameter w_s: -1.0 is outside [0.0, 15.0]"),
    (dict(params={"w_c": [1.0, 2.0, 99.0, 1.0]}), "99.0 in the per-step list is outside [0.0, 15.0]"),
    (dict(sampler="profusion", params={"refine_steps": 99}), "parameter refine_steps: 99 is outside [0, 5]"),
    (dict(sampler=["mixed"]), "sampler: list given"),
    (dict(params=[1, 2]), "parameters: list given"),
])
def test_bad_generation_request_is_refused_before_anything_is_built(lab, kwargs, message):
    refused(lab, message, **kwargs)


def test_long_phrase_is_refused(lab):
    from personalize.runs.lab import Concept

    concept = Concept("x" * 1000, "dog")
    with pytest.raises(UserError, match="--concept-phrase: 1000 characters, over the limit of 100"):
        lab.request(concept, PROMPT, "mixed", {}, steps=4)


def test_absurd_steps_allocate_nothing(lab):
    tracemalloc.start()
    for steps in (10 ** 9, 300_000):
        with pytest.raises(UserError):
            lab.request(lab.default_concept, PROMPT, "profusion", {}, steps=steps)
        with pytest.raises(UserError, match=f"in \\[1, {MAX_STEPS}\\]"):
            configure("profusion", {}, steps)               # the sampler table bounds it too
    with pytest.raises(UserError, match="no plan is built"):
        plan(SamplerConfig("concept", 10 ** 9, {"w": 7.0}))  # a config made by hand
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5 * 2 ** 20


def test_steps_beyond_the_schedulers_training_timesteps_are_refused(demo_dir):
    from personalize.runs.request import train_timesteps

    n = train_timesteps(str(demo_dir))
    req = Request(prompt=PROMPT, model=str(demo_dir), steps=n + 1)
    with pytest.raises(UserError, match=f"more than the scheduler's {n} training timesteps"):
        check(req)                                           # even with the command line's limits


def test_total_cost_is_bounded(lab):
    # photoswap (4 rows per step while swapping), 8 images of 1024 x 1024, 150 steps
    refused(lab, "denoiser row-pixels", sampler="photoswap", steps=150, num_images=8, size=1024)
    small = Limits(max_cost=10)
    with pytest.raises(UserError, match="over this server's limit of 10"):
        check(Request(prompt=PROMPT, model=lab.model, steps=2, height=64, width=64), small)


def test_limits_come_from_the_environment():
    limits = Limits.serving({"PERSONALIZE_MAX_STEPS": "60", "PERSONALIZE_MAX_COST": "1_000"})
    assert limits.max_steps == 60 and limits.max_cost == 1000 and limits.max_side == Limits().max_side
    with pytest.raises(UserError, match="PERSONALIZE_MAX_STEPS: 'lots' is not a whole number"):
        Limits.serving({"PERSONALIZE_MAX_STEPS": "lots"})


@pytest.mark.parametrize("samplers,message", [
    (["profusion"] * 1000, "there are only 8"),
    (["mixed", "concept", "mixed"], "'mixed' is given more than once"),
    ([], "choose at least one sampler"),
    ([1, 2], "give a list of sampler names"),
])
def test_compare_refuses_duplicated_or_too_many_samplers(lab, samplers, message):
    with pytest.raises(UserError, match=message):
        compare_runs(lab, lab.default_concept, [], PROMPT, samplers, "{}", 0, 4)


def test_compare_cost_is_the_sum_of_its_runs(lab):
    names = ["profusion", "photoswap", "masked", "mixed"]
    with pytest.raises(UserError, match="compare: these 4 runs need"):
        compare_runs(lab, lab.default_concept, [], PROMPT, names, "{}", 0, 150, size=512)  # each alone passes


@pytest.mark.parametrize("text,message", [
    ("[" * 100_000 + "]" * 100_000, "over the limit of 20000"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    (12, "int given"),
])
def test_params_text_deep_or_long_is_refused(text, message):
    with pytest.raises(UserError, match=message):
        parse_json_object(text, "parameters")


def test_nan_scores_are_written_as_null(tmp_path):
    from PIL import Image

    card = {"is": math.nan, "ts": math.inf, "params": {"w": [1.0, -math.inf]}}
    write_run(tmp_path / "run", card, [Image.new("RGB", (8, 8))])

    def refuse(constant):
        raise AssertionError(f"bare {constant} in run.json")
    data = json.loads((tmp_path / "run" / "run.json").read_text(), parse_constant=refuse)
    assert data["is"] is None and data["ts"] is None and data["params"]["w"] == [1.0, None]


# -- sweeps: images written whole, results uploads bounded -------------------------------

def test_sweep_image_is_whole_or_absent(tmp_path, monkeypatch):
    import os

    from PIL import Image

    from personalize.evaluation import sweep

    image = Image.new("RGB", (16, 16), (1, 2, 3))
    target = tmp_path / "s0_00.png"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(sweep.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))

    def power_cut(src, dst):
        raise OSError("power cut before the rename")
    monkeypatch.setattr(sweep.os, "replace", power_cut)
    with pytest.raises(OSError):
        sweep.save_image(image, target)
    assert list(tmp_path.iterdir()) == []           # no truncated image, no temporary file left
    monkeypatch.undo()
    sweep.save_image(image, target)
    assert Image.open(target).getpixel((0, 0)) == (1, 2, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["s0_00.png"]
    assert synced                                    # the file was synced before it was renamed


def results_csv(path, rows=2, extra=""):
    header = "concept,prompt,sampler,params,seed,image,is,ts,random_weights,secret\n"
    body = "".join(f'c,a {{}},mixed,"{{""w"": {k}}}",0,0,0.5,0.3,true,x\n' for k in range(rows))
    path.write_text(header + body + extra)
    return str(path)


def test_results_upload_keeps_only_the_charts_columns(lab, tmp_path):
    rows = lab.read_results(results_csv(tmp_path / "r.csv"))
    assert len(rows) == 2 and "secret" not in rows[0] and rows[0]["sampler"] == "mixed"


@pytest.mark.parametrize("make,message", [
    (lambda p: results_csv(p, rows=3, extra="c,p,mixed,not json,0,0,0.5,0.3,true,x\n"), "row 4 has no JSON object"),
    (lambda p: results_csv(p, extra='c,p,mixed,"{}",0,0,nan,0.3,true,x\n'), "no finite is and ts"),
    (lambda p: (p.write_text("a,b\n1,2\n"), str(p))[1], "not a sweep's results table (no column 'concept')"),
    (lambda p: (p.write_bytes(b"\xff\xfe\x00bad"), str(p))[1], "not UTF-8 text"),
    (lambda p: (p.write_text("concept\n" + "x" * 200_000 + "\n"), str(p))[1], "not a sweep's results table"),
])
def test_bad_results_upload_gets_a_message(lab, tmp_path, make, message):
    with pytest.raises(UserError, match=re.escape(message)):
        lab.read_results(make(tmp_path / "r.csv"))


def test_results_upload_size_and_rows_are_limited(tmp_path):
    from personalize.runs.lab import read_results_upload

    path = results_csv(tmp_path / "r.csv", rows=20)
    with pytest.raises(UserError, match="more than 10 rows"):
        read_results_upload(path, max_rows=10)
    big = tmp_path / "big.csv"
    with open(big, "wb") as f:
        f.truncate(2 * 2 ** 20)                       # sparse: 2 MB that are never read
    with pytest.raises(UserError, match="2 MB is over the limit of 1 MB"):
        read_results_upload(str(big), max_mb=1)


# -- concepts: the path box names offered concepts only; references bounded --------------

def test_concept_path_box_only_reaches_the_concepts_folder(demo_dir, tmp_path):
    from personalize.runs.lab import CONCEPT_PATH_REFUSED

    root = tmp_path / "concepts"
    (root / "toy").mkdir(parents=True)
    (root / "toy" / "learned_embeds.safetensors").write_bytes(b"")
    lab = Lab(str(demo_dir), try_study_model=False, concepts_dir=str(root))
    for path in ("/etc/passwd", "/etc", "/no/such/file", str(demo_dir), "../../etc/passwd", "toy/../../x",
                 str(root), "", "missing-here"):
        with pytest.raises(UserError) as info:
            lab.check_concept_path(path)
        assert str(info.value) == CONCEPT_PATH_REFUSED          # one message: existence is not told
    assert lab.check_concept_path("toy") == str((root / "toy").resolve())
    closed = Lab(str(demo_dir), try_study_model=False)           # no folder: nothing but uploads
    with pytest.raises(UserError, match="not a concept this server offers"):
        closed.make_concept("sks dog", "dog", weights=str(root / "toy"))


def test_reference_images_are_limited_and_downscaled_once(lab, tmp_path):
    from PIL import Image

    from personalize.runs import lab as lab_module

    big = tmp_path / "big.png"
    Image.new("RGB", (1500, 1000), (200, 10, 10)).save(big)
    (copy,) = lab.check_references([str(big)])
    with Image.open(copy) as im:
        assert max(im.size) == lab_module.REFERENCE_SIDE and im.size == (512, 341)
    with pytest.raises(UserError, match="at most 16"):
        lab.check_references([str(big)] * 17)


def test_huge_reference_is_refused_from_its_header(lab, tmp_path, monkeypatch):
    import struct
    import zlib

    from personalize.runs import lab as lab_module

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = tmp_path / "bomb.png"   # 13000 x 13000 in its header, a few bytes on disk
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 13000, 13000, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    tracemalloc.start()
    with pytest.raises(UserError, match="13000 x 13000 pixels is over the limit of 64 megapixels"):
        lab.check_references([str(bomb)])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2 ** 20


def test_failed_concept_removal_drops_the_pipeline(monkeypatch):
    from personalize.models import loading
    from personalize.runs import request as runs

    class Pipe:
        pass

    class Applied:
        def remove(self):
            raise RuntimeError("CUDA out of memory")
    pipe = Pipe()
    monkeypatch.setitem(loading._cache, ("model", "cpu"), pipe)
    runs._applied[pipe] = (("/c", "sks", 1.0), Applied())
    with pytest.raises(RuntimeError, match="out of memory"):
        runs.use_concept(pipe, None, "sks", 1.0)
    assert pipe not in runs._applied and pipe not in loading._cache.values()


# -- serving ---------------------------------------------------------------------------------

def test_rate_limit_per_client():
    from types import SimpleNamespace

    from ui.serving import RateLimit

    now = [0.0]
    rate = RateLimit(3, clients=2, clock=lambda: now[0])
    alice, bob = (SimpleNamespace(client=SimpleNamespace(host=h)) for h in ("1.1.1.1", "2.2.2.2"))
    for _ in range(3):
        rate.check(alice)
    with pytest.raises(UserError, match="at most 3 a minute"):
        rate.check(alice)
    rate.check(bob)
    now[0] = 61.0
    rate.check(alice)
    for k in range(100):                               # many addresses: the table stays bounded
        rate.check(SimpleNamespace(client=SimpleNamespace(host=f"10.0.0.{k}")))
    assert len(rate.seen) == 2


def test_old_run_folders_are_cleaned(tmp_path):
    import os

    from ui.serving import clean_temp_folders

    old, new, other = (tmp_path / n for n in ("personalize-run-old", "personalize-run-new", "unrelated"))
    for folder in (old, new, other):
        folder.mkdir()
    os.utime(old, (0, 0))
    os.utime(other, (0, 0))
    assert clean_temp_folders(3600, root=str(tmp_path)) == 1
    assert not old.exists() and new.exists() and other.exists()


def test_launch_serves_exact_files_and_bounds_queue_and_cache(lab, monkeypatch):
    import inspect
    from pathlib import Path

    import gradio as gr

    from ui.serving import blocks_settings, launch_settings, queue_settings

    monkeypatch.setenv("PERSONALIZE_QUEUE_SIZE", "5")
    assert queue_settings() == {"default_concurrency_limit": 1, "max_size": 5}
    settings = launch_settings(lab)
    assert settings["allowed_paths"] and all(Path(p).is_file() for p in settings["allowed_paths"])
    assert blocks_settings()["delete_cache"][1] == 3600
    # each setting goes where this gradio takes it (`python app.py` once failed on delete_cache)
    assert set(settings) <= set(inspect.signature(gr.Blocks.launch).parameters)
    assert set(blocks_settings()) <= set(inspect.signature(gr.Blocks.__init__).parameters)
    assert set(queue_settings()) <= set(inspect.signature(gr.Blocks.queue).parameters)


def test_study_banner_when_answers_would_be_wiped(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from ui.serving import study_storage_warning

    study = SimpleNamespace(store=SimpleNamespace(path=tmp_path / "answers.sqlite"))
    monkeypatch.delenv("PERSONALIZE_STUDY_DB", raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert study_storage_warning(study) is None                     # not a Space
    monkeypatch.setenv("SPACE_ID", "me/study")
    assert "wiped when the Space restarts" in study_storage_warning(study)
    monkeypatch.setenv("PERSONALIZE_STUDY_DB", str(tmp_path / "answers.sqlite"))
    assert study_storage_warning(study) is None


def test_behind_a_space_proxy_rates_count_per_visitor(monkeypatch):
    from ui.serving import trust_proxy

    env = {"SPACE_ID": "me/app"}
    trust_proxy(env)
    assert env["FORWARDED_ALLOW_IPS"] == "*"          # uvicorn reads X-Forwarded-For from the proxy
    env = {"SPACE_ID": "me/app", "FORWARDED_ALLOW_IPS": "10.0.0.1"}
    trust_proxy(env)
    assert env["FORWARDED_ALLOW_IPS"] == "10.0.0.1"   # an explicit setting is kept
    env = {}
    trust_proxy(env)
    assert env == {}                                  # locally: uvicorn's default (loopback only)


def test_zero_gpu_loads_the_pipeline_when_the_app_starts(demo_dir, monkeypatch):
    from app import prepare_serving
    from personalize.models import loading
    from personalize.runs.lab import Lab

    monkeypatch.setattr(loading, "_cache", {})
    lab = Lab(str(demo_dir), try_study_model=False)
    prepare_serving(lab, zero_gpu=False)
    assert loading._cache == {}                       # elsewhere the first run loads it
    prepare_serving(lab, zero_gpu=True)
    assert list(loading._cache) == [(lab.model, lab.device, lab.dtype, lab.scheduler)]


def test_serving_sets_one_torch_thread_on_the_cpu(demo_dir, monkeypatch):
    """A server calls torch from many threads, each with its own OpenMP team: one thread on
    the CPU (personalize/runs/threads.py says what was measured)."""
    import torch

    from app import prepare_serving
    from personalize.runs.lab import Lab
    from personalize.runs.threads import THREADS_ENV, serving_threads, use_serving_threads

    before = torch.get_num_threads()
    try:
        lab = Lab(str(demo_dir), try_study_model=False)
        monkeypatch.delenv(THREADS_ENV, raising=False)
        torch.set_num_threads(2)
        prepare_serving(lab, zero_gpu=False)
        assert lab.device == "cpu" and torch.get_num_threads() == 1
        monkeypatch.setenv(THREADS_ENV, "2")
        prepare_serving(lab, zero_gpu=False)
        assert torch.get_num_threads() == 2
        monkeypatch.delenv(THREADS_ENV)
        use_serving_threads("cuda")    # the CPU threads only feed a GPU: left as torch set them
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    for bad, message in (("two", "is not a whole number"), ("0", "must be at least 1")):
        with pytest.raises(UserError, match=f"{THREADS_ENV}: '{bad}' {message}"):
            serving_threads("cpu", {THREADS_ENV: bad})


def test_app_refuses_a_bad_thread_setting_with_a_message(demo_dir, monkeypatch, capsys):
    from app import main

    monkeypatch.setenv("PERSONALIZE_TORCH_THREADS", "two")
    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(demo_dir)])
    assert exit_.value.code == 2
    assert "error: PERSONALIZE_TORCH_THREADS: 'two' is not a whole number" in capsys.readouterr().err
