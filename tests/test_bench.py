"""The benchmark on the tiny demo architecture: its JSON, rows, ratios, the training
section; the SD2 config."""

import contextlib
import io
import json
import statistics

import pytest
import torch

from personalize.evaluation import bench
from personalize.cli import main
from personalize.sampling.samplers import SAMPLERS, configure, plan, total_rows
from personalize.training import METHODS

STEPS, SIZE, TRAINING_STEPS = 2, 64, 2
ARGS = ["bench", "--arch", "demo", "--steps", str(STEPS), "--size", str(SIZE), "--repeats", "2", "--warmup", "0",
        "--training-steps", str(TRAINING_STEPS)]


@pytest.fixture(scope="module")
def report():
    """One in-process `bench --json` run; stdout must be exactly one JSON object."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(ARGS + ["--json"]) == 0
    return json.loads(out.getvalue())


def test_json_has_the_interface_keys(report):
    assert {"device", "model", "steps", "size", "diffusers_concept_s", "samplers"} <= set(report)
    assert (report["device"], report["steps"], report["size"]) == ("cpu", STEPS, SIZE)
    assert report["model"].startswith("arch:demo")
    assert list(report["samplers"]) == list(SAMPLERS)
    for entry in [report["diffusers"], *report["samplers"].values()]:
        assert isinstance(entry["rows"], int)
        for key in ("s", "peak_mb", "s_per_row"):
            assert isinstance(entry[key], float) and entry[key] > 0
        assert len(entry["runs_s"]) == 2
    assert report["diffusers_concept_s"] == report["diffusers"]["s"]


def test_rows_are_the_plans_rows(report):
    assert report["diffusers"]["rows"] == 2 * STEPS  # classifier-free guidance: [u, C] every step
    for name, entry in report["samplers"].items():
        config = configure(name, {}, STEPS)  # the defaults, step counts scaled to the run
        assert entry["params"] == dict(config.params)
        assert entry["rows"] == total_rows(plan(config))


def test_onnx_rows_for_the_samplers_that_can(report):
    """On a CPU in float32 each sampler that does not reach into attention is timed again
    with its denoiser in ONNX Runtime: the same rows, its own time."""
    pytest.importorskip("onnxruntime")
    want = [n + bench.ONNX for n in SAMPLERS if n not in ("masked", "photoswap")]
    assert list(report["onnx"]) == want
    for name, entry in report["onnx"].items():
        assert entry["rows"] == report["samplers"][name.removesuffix(bench.ONNX)]["rows"]
        assert entry["s"] == statistics.median(entry["runs_s"]) and len(entry["runs_s"]) == 2


def test_ratios_are_computed_from_the_reported_medians(report):
    entries = dict(report["samplers"], **report["onnx"], diffusers=report["diffusers"])
    for entry in entries.values():
        assert entry["s"] == statistics.median(entry["runs_s"])
        assert entry["s_per_row"] == entry["s"] / entry["rows"]
    ratios = report["ratios"]
    for t in bench.TARGETS:
        r = ratios[t.name]
        assert r["value"] == entries[t.numerator][t.measure] / entries[t.denominator][t.measure]
        assert r["met"] == (r["value"] <= t.limit)
    assert ratios["concept / diffusers"]["value"] == report["samplers"]["concept"]["s"] / report["diffusers_concept_s"]
    for name in SAMPLERS:
        if name != "concept":
            r = ratios[f"{name} / concept (s_per_row)"]
            assert r["value"] == entries[name]["s_per_row"] / entries["concept"]["s_per_row"]
            assert r["met"] == (abs(r["value"] - 1) <= 0.10)


def test_table_names_every_method_and_target(report):
    table = bench.format_report(report)
    for name in ["diffusers", *SAMPLERS, *report["onnx"], *report["ratios"], "training:", *METHODS]:
        assert name in table


def test_training_rows_per_method(report):
    training = report["training"]
    assert (training["steps"], training["resolution"], training["reference"]) == (TRAINING_STEPS, SIZE, "svdiff")
    assert list(training["methods"]) == list(METHODS)
    for name, row in training["methods"].items():
        assert row["method"] == name and "error" not in row
        assert (row["steps"], row["resolution"], row["device"]) == (TRAINING_STEPS, SIZE, "cpu")
        assert row["seconds_per_step"] > 0 and row["steps_per_s"] == 1 / row["seconds_per_step"]
        assert row["file_bytes"] > 0 and row["file_mb"] == row["file_bytes"] / 2 ** 20
        assert 0 <= row["added_memory_mb"] <= row["peak_memory_mb"]
    files = {name: row["file_bytes"] for name, row in training["methods"].items()}
    # one embedding row < rank-4 adapters < full attention weights (the ordering of what each method saves)
    assert files["textual-inversion"] < files["lora"] < files["dreambooth"]


def test_training_ratios_are_computed_from_the_rows(report):
    training = report["training"]
    rows = training["methods"]
    ref = rows["svdiff"]
    concept_row_s = report["samplers"]["concept"]["s_per_row"]
    assert set(training["ratios"]) == set(METHODS)
    for name, r in training["ratios"].items():
        assert r["reference"] == "svdiff"
        assert r["s_per_step"] == rows[name]["seconds_per_step"] / ref["seconds_per_step"]
        assert r["file"] == rows[name]["file_bytes"] / ref["file_bytes"]
        assert r["step_rows"] == rows[name]["seconds_per_step"] / concept_row_s
    assert training["ratios"]["svdiff"]["s_per_step"] == 1.0
    assert training["ratios"] == bench.training_ratios(list(rows.values()), report["samplers"]["concept"])


def test_training_figures_are_training_benchs(report):
    """The report's file sizes are what `training_bench` itself measures on the same architecture."""
    from personalize.models.architectures import ARCHITECTURES, build_pipeline
    from personalize.training.bench import training_bench

    pipe = build_pipeline(ARCHITECTURES["demo"], device=torch.device("cpu"), dtype=torch.float32)
    rows = training_bench(pipe, ["lora", "textual-inversion"], TRAINING_STEPS, resolution=SIZE)
    for row in rows:
        assert row["file_bytes"] == report["training"]["methods"][row["method"]]["file_bytes"]
        assert set(row) == set(report["training"]["methods"][row["method"]])


def test_training_ratios_reference_and_errors():
    common = dict(peak_memory_mb=500.0, memory_kind="process peak RSS (sampled)")
    rows = [dict(method="lora", seconds_per_step=2.0, added_memory_mb=10.0, file_bytes=1000, **common),
            dict(method="svdiff", error="--method: svdiff does not apply to SD-XL models"),
            dict(method="dreambooth", seconds_per_step=3.0, added_memory_mb=0.0, file_bytes=4000, **common)]
    ratios = bench.training_ratios(rows, {"s_per_row": 0.5})
    assert list(ratios) == ["lora", "dreambooth"]     # svdiff did not run: lora, the first measured, is the reference
    assert ratios["dreambooth"] == {"reference": "lora", "s_per_step": 1.5, "added_memory": 0.0, "file": 4.0,
                                    "step_rows": 6.0}
    assert bench.training_ratios(rows[2:] + rows[:1])["lora"]["added_memory"] is None   # over a zero reference
    assert bench.training_ratios([rows[1]]) == {}
    table = bench.format_training({"steps": 3, "resolution": 64, "reference": "svdiff",
                                   "methods": {r["method"]: r for r in rows}, "ratios": ratios})
    assert "ratio of lora's" in table[0] and "does not apply" in table[3]
    assert table[2].split() == ["lora", "2.000", "500", "10.0", "1000", "B", "1.00", "1.00", "1.00", "4.0"]
    assert table[4].split() == ["dreambooth", "3.000", "500", "0.0", "3.9", "KB", "1.50", "0.00", "4.00", "6.0"]
    assert (bench.file_size(512), bench.file_size(1536), bench.file_size(3 * 2 ** 30)) == ("512 B", "1.5 KB",
                                                                                          "3.00 GB")


def test_no_training_skips_the_section(capsys):
    args = ["bench", "--arch", "demo", "--steps", "1", "--size", str(SIZE), "--repeats", "1", "--warmup", "0",
            "--samplers", "concept", "--no-training", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert "training" not in report and list(report["samplers"]) == ["concept"]
    assert main(args + ["--no-onnx"]) == 0
    assert json.loads(capsys.readouterr().out)["onnx"] == {}


@pytest.mark.parametrize("extra,message", [
    (["--training-steps", "1"], "--training-steps: 1 must be at least 2"),
    (["--training-methods", "svdiff,hypernetwork"], "--training-methods: 'hypernetwork' is not one of"),
    (["--training-methods", ","], "--training-methods: ',' names no method"),
    (["--size", "72"], "--size: 72 is not a training resolution"),
    (["--model", "x"], "not both"),
    (["--size", "100"], "--size: 100 must be a positive multiple of 8"),
    (["--samplers", "concept,nope"], "--samplers: 'nope' is not a sampler"),
    (["--steps", "0"], "--steps: 0 must be at least 1"),
    (["--threads", "0"], "--threads: 0 must be at least 1"),
    (["--dtype", "float64"], "--dtype"),
])
def test_bad_options_are_one_line_errors(capsys, extra, message):
    assert main(ARGS + extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_sd2_architecture_has_sd2_base_parameter_counts():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from personalize.models.architectures import SD2, build_unet

    with torch.device("meta"):  # shapes only: instant, no memory
        unet = build_unet(SD2)
        vae = AutoencoderKL(**SD2.vae)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD2.text_encoder))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 865_910_724  # stabilityai/stable-diffusion-2-base
    assert count(vae) == 83_653_863
    assert count(text_encoder) == 340_387_840
    assert SD2.size == 512


def test_without_a_model_bench_times_the_shipped_world():
    from argparse import Namespace

    from personalize.cli.bench import load
    from personalize.world.paths import is_world, shipped_world

    world = shipped_world()
    if world is None:
        pytest.skip("no world is shipped in this checkout")
    _, model = load(Namespace(model=None, arch=None, device="cpu", dtype="float32"))
    assert model == str(world) and is_world(model)
    _, named = load(Namespace(model=None, arch="demo", device="cpu", dtype="float32"))
    assert named.startswith("arch:demo")   # an --arch still means random weights
