"""`reproduce --quick` on a quick world: every report file, the judge's columns in the
sweep rows, and a second run that resumes to the same report."""

from __future__ import annotations

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
    timing = lambda lines: [l for l in lines if not l.startswith("Sweep wall time")]  # noqa: E731
    assert timing(before) == timing(after)


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
