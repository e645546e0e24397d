"""`reproduce --quick` on a quick world: every report file, the judge's columns in the
sweep rows, and a second run that resumes to the same report."""

from __future__ import annotations

import importlib.util
import json

import pytest

from personalize.evaluation import reproduce as R
from personalize.evaluation.sweep import read_rows


@pytest.fixture(scope="module")
def world(quick_world):
    return quick_world[0]


@pytest.fixture(scope="module")
def report(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "r"
    meta = R.reproduce(world, out, quick=True, steps=2, progress=False)
    return out, meta


def test_quick_report_has_every_file(report):
    out, meta = report
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    html = (out / "report.html").read_text()
    assert html.count("plotly-graph-div") >= len(R.FIGURES)
    assert '<script src="http' not in html  # plotly.js inline: the page works offline
    md = (out / "report.md").read_text()
    for heading in ("## Per sampler point", "## The study's claims, measured", "## How well the metrics"):
        assert heading in md
    for claim in ("monotone in w_s", "below mixed's frontier", "between switching and mixed",
                  "masked crosses", "Photoswap is close", "approaches mixed", "exceeds concept"):
        assert claim in md
    pngs = sorted(p.stem for p in (out / "charts").glob("*.png"))
    if "matplotlib is not installed" not in md:
        assert {"mixed", "all", "judge_all"} <= set(pngs)


def test_rows_carry_the_judges_verdicts(report):
    out, _ = report
    rows = read_rows(out / "sweep" / "results.csv")
    assert {r["sampler"] for r in rows} == {"concept", "mixed", "switching", "multistage", "masked", "profusion",
                                            "photoswap"}
    for r in rows:
        assert r["concept_fidelity"] in ("0", "1") and r["context_fidelity"] in ("0", "1")
        assert r["random_weights"] == "false" and "open_clip folder" in r["metric_models"]


def test_rerun_resumes_to_the_same_report(report, world):
    out, _ = report
    before = (out / "report.md").read_text().splitlines()
    meta = R.reproduce(world, out, quick=True, steps=2, progress=False)
    assert meta["new_images"] == 0
    after = (out / "report.md").read_text().splitlines()
    assert before == after  # the wall time counts only runs that computed images
    runs = json.loads((out / R.TIMING_FILE).read_text())
    assert len(runs) == 2 and runs[0]["new_images"] > 0 and runs[1]["new_images"] == 0
    # `--runtime auto`: ONNX Runtime where it is installed
    assert runs[0]["runtime"] == ("onnx" if importlib.util.find_spec("onnxruntime") else "torch")
    assert f"{runs[0]['new_images']} images in 1 run(s)" in "\n".join(after)


def test_wall_time_sums_the_runs_that_computed_images():
    runs = [{"seconds": 100.0, "new_images": 200, "processes": 2}, {"seconds": 50.0, "new_images": 100,
                                                                     "processes": 1},
            {"seconds": 3.0, "new_images": 0, "processes": 1}]
    line = R.wall_time(runs)
    assert "150 s" in line and "300 images in 2 run(s)" in line and "1/2 process(es)" in line
    assert "2.00 images/s" in line
    assert "no images" in R.wall_time([{"seconds": 1.0, "new_images": 0, "processes": 1}])
    assert line.endswith("denoiser in PyTorch.")  # runs recorded before the runtime was
    onnx = R.wall_time([dict(runs[0], runtime="onnx")])
    assert onnx.endswith("denoiser in ONNX Runtime (masked sampling and Photoswap in PyTorch).")


def test_pure_numbers():
    lo, hi = R.wilson(5, 10)
    assert lo < 0.5 < hi and R.wilson(0, 0)[0] != R.wilson(0, 0)[0]
    assert R.mean_ci([1.0, 1.0]) == (1.0, 0.0)
    points = [{"sampler": "mixed", "params": {"w_s": w}, "ts": w / 7, "is": 1 - w / 7} for w in range(8)]
    (claim, verdict, _), *_ = R.findings(points, "ts", "is")
    assert "monotone" in claim and verdict == "confirmed"
    grid = {s["name"]: s["points"] for s in R.study_samplers(25)}
    assert [p["t_sw"] for p in grid["switching"]] == [1, 2, 3, 4, 5, 10, 15, 20]
    assert len(grid["profusion"]) == 9 and len(grid["masked"]) == 4 and len(grid["photoswap"]) == 3


def test_throughput_batches_the_same_denoiser_work(world):
    """The three ways make the same images with the same denoiser rows; only the sweep's
    way puts every image of a step in one call (a loop that ran images one by one would
    show `steps * images` calls)."""
    from personalize.world.check import load_world_pipeline

    steps, prompts, images = 2, 2, 3
    t = R.throughput(load_world_pipeline(world), prompts=prompts, images=images, steps=steps,
                     onnx=importlib.util.find_spec("onnxruntime") is not None)
    ways, n = t["ways"], prompts * images
    assert {w["denoiser_rows"] for w in ways.values()} == {2 * steps * n}   # CFG: two rows per image and step
    assert ways["sweep"]["denoiser_calls"] == steps
    if "sweep onnx" in ways:  # the same batching, counted inside ONNX Runtime's runner
        assert ways["sweep onnx"]["denoiser_calls"] == steps
        assert t["sweep_onnx_vs_sweep"] == pytest.approx(ways["sweep"]["seconds"] / ways["sweep onnx"]["seconds"])
    assert ways["generate"]["denoiser_calls"] == steps * n
    assert ways["diffusers"]["denoiser_calls"] == steps * prompts
    assert t["sweep_vs_generate"] == pytest.approx(ways["sweep"]["images_per_s"] / ways["generate"]["images_per_s"])


def test_bench_on_a_world_adds_the_throughput_section(world):
    import contextlib
    import io

    from personalize.cli import main
    from personalize.evaluation.bench import format_report

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["bench", "--model", str(world), "--samplers", "concept", "--no-training", "--repeats", "1",
                     "--warmup", "0", "--steps", "2", "--throughput-images", "1", "--json"]) == 0
    t = json.loads(out.getvalue())["throughput"]
    # the bench's own settings reach the section: 2 steps, 4 prompts of 1 image
    assert (t["steps"], t["images"]) == (2, 4)
    assert t["ways"]["sweep"]["denoiser_calls"] == 2 and t["ways"]["generate"]["denoiser_calls"] == 8
    table = format_report({**json.loads(out.getvalue())})
    assert "sweep (batched)" in table and "sweep / generate" in table


def test_bench_elsewhere_has_no_throughput_section():
    import contextlib
    import io

    from personalize.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert main(["bench", "--arch", "demo", "--samplers", "concept", "--no-training", "--repeats", "1",
                     "--warmup", "0", "--steps", "1", "--size", "64", "--json"]) == 0
    assert "throughput" not in json.loads(out.getvalue())


def test_throughput_verdict_follows_the_target():
    from personalize.evaluation.bench import format_throughput

    ways = {w: {"images_per_s": 1.0, "denoiser_calls": 1, "denoiser_rows": 2} for w in ("sweep", "generate",
                                                                                       "diffusers")}
    base = {"images": 4, "prompts": 2, "steps": 2, "size": 64, "ways": ways, "sweep_vs_diffusers": 1.0,
            "min_sweep_vs_generate": 3.0}
    assert format_throughput(dict(base, sweep_vs_generate=3.2))[-2].endswith(" met")
    assert format_throughput(dict(base, sweep_vs_generate=2.9))[-2].endswith("MISSED")


def test_a_two_point_claim_within_the_intervals_is_not_resolved():
    def point(sampler, params, y, ci):
        return {"sampler": sampler, "params": params, "ts": 0.3, "is": y, "is_ci": ci}

    def verdict(top, ci):
        points = [point("concept", {"w": 7.0}, 0.42, ci)] + [point("profusion", {"r": r}, v, ci)
                                                             for r, v in ((0.1, 0.40), (0.5, 0.41), (1.0, top))]
        return dict((c, v) for c, v, _ in R.findings(points, "ts", "is"))["ProFusion exceeds concept sampling's "
                                                                           "fidelity at high r"]

    assert verdict(0.43, 0.02) == "not resolved"
    assert verdict(0.50, 0.02) == "confirmed"
    assert verdict(0.30, 0.02) == "NOT confirmed"
    lo, hi = R.interval({"f": 0.5, "f_ci": (0.4, 0.6)}, "f")
    assert (lo, hi) == (0.4, 0.6)
