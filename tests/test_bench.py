"""The benchmark on the tiny demo architecture: its JSON, rows, ratios; the SD2 config."""

import contextlib
import io
import json
import statistics

import pytest
import torch

from personalize.evaluation import bench
from personalize.cli import main
from personalize.sampling.samplers import SAMPLERS, configure, plan, total_rows

STEPS, SIZE = 2, 64
ARGS = ["bench", "--arch", "demo", "--steps", str(STEPS), "--size", str(SIZE), "--repeats", "2", "--warmup", "0"]


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


def test_ratios_are_computed_from_the_reported_medians(report):
    entries = dict(report["samplers"], diffusers=report["diffusers"])
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
    for name in ["diffusers", *SAMPLERS, *report["ratios"]]:
        assert name in table


@pytest.mark.parametrize("extra,message", [
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
