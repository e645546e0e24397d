"""The Pareto frontier, the per-point summary, the figure and the `pareto` verb."""

import csv
import json
import random

import pytest

from personalize.cli import main
from personalize.evaluation.pareto import curves, dominates, figure, pareto_front, summarize
from personalize.evaluation.sweep import COLUMNS


def brute_front(points):
    return {i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)}


@pytest.mark.parametrize("seed", range(40))
def test_front_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(0, 40)
    # Few distinct values: many ties in x, in y, and exact duplicates.
    values = [rng.randint(0, 6) / 2 for _ in range(4)] if seed % 2 else None
    pick = (lambda: rng.choice(values)) if values else rng.random
    points = [(pick(), pick()) for _ in range(n)]
    points += [points[k] for k in range(0, n, 5)]  # duplicates of some points
    front = pareto_front(points)
    assert len(front) == len(set(front))
    assert set(front) == brute_front(points)
    assert [points[i][0] for i in front] == sorted((points[i][0] for i in front), reverse=True)


def test_front_ties_and_duplicates():
    points = [(1, 1), (1, 1), (0, 2), (0, 2), (1, 0), (0, 1), (2, 0), (2, 0), (-1, 2)]
    assert sorted(pareto_front(points)) == [0, 1, 2, 3, 6, 7]
    assert pareto_front([]) == []
    with pytest.raises(ValueError):
        pareto_front([(float("nan"), 1.0)])


def row(sampler, params, concept, prompt, image, is_, ts, random_weights="false"):
    return {"sampler": sampler, "params": json.dumps(params), "concept": concept, "prompt": prompt,
            "seed": "0", "image": str(image), "is": str(is_), "ts": str(ts), "ts_class": str(ts + 0.1),
            "dino": str(is_ - 0.1), "random_weights": random_weights}


def sample_rows(random_weights="false"):
    rows = []
    # mixed at two points; IS is the mean over prompts of the per-prompt means
    for w_s, base in ((0.0, 0.8), (3.5, 0.7)):
        params = {"w_c": 7 - w_s, "w_s": w_s}
        rows += [row("mixed", params, "dog", "a {} in the snow", k, base + 0.01 * k, 0.2 + w_s / 100, random_weights)
                 for k in range(3)]
        rows += [row("mixed", params, "dog", "a red {}", 0, base - 0.1, 0.3 + w_s / 100, random_weights)]
    for t_sw in (7, 1, 3):  # written out of order: the curve sorts them
        rows += [row("switching", {"w": 7.0, "t_sw": t_sw}, "dog", "a red {}", 0, 0.75 - t_sw / 100,
                     0.2 + t_sw / 100, random_weights)]
    return rows


def test_summarize_means_over_prompts():
    points = {(p.sampler, p.params.get("w_s"), p.params.get("t_sw")): p for p in summarize(sample_rows())}
    p = points[("mixed", 0.0, None)]
    snow = (0.80 + 0.81 + 0.82) / 3
    assert p.y == pytest.approx((snow + 0.7) / 2)          # mean over prompts, not over images
    assert p.x == pytest.approx((0.2 + 0.3) / 2)
    assert p.groups == 2 and p.images == 4
    assert p.y_std == pytest.approx(abs(snow - 0.7) / 2 ** 0.5)  # sample std of two group means
    d = {(q.sampler, q.params.get("w_s")): q for q in summarize(sample_rows(), "ts_class", "dino")}
    assert d[("mixed", 0.0)].y == pytest.approx(p.y - 0.1)


def test_curves_sorted_along_their_parameter():
    named = dict(curves(summarize(sample_rows())))
    assert [p.params["t_sw"] for p in named["switching w=7"]] == [1, 3, 7]
    assert [p.params["w_s"] for p in named["mixed"]] == [0.0, 3.5]


def test_figure_traces_hover_and_frontier():
    fig = figure(sample_rows())
    names = [t.name for t in fig.data]
    assert names == ["mixed", "switching w=7", "Pareto frontier"]
    mixed = fig.data[0]
    assert "w_s=3.5" in mixed.text[1] and "±" in mixed.text[1] and "4 images" in mixed.text[1]
    points = summarize(sample_rows())
    front = [points[i] for i in pareto_front([(p.x, p.y) for p in points])]
    assert list(fig.data[-1].x) == [p.x for p in front]
    assert "RANDOM" not in fig.layout.title.text


def test_figure_labels_random_weights():
    fig = figure(sample_rows("true"))
    assert "RANDOM-WEIGHT" in fig.layout.title.text
    assert all("[random weights]" in t.name for t in fig.data[:-1])
    assert "RANDOM-WEIGHT" in fig.data[0].text[0]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def test_pareto_verb_writes_html(tmp_path, capsys):
    write_csv(tmp_path / "results.csv", sample_rows())
    out = tmp_path / "chart" / "pareto.html"
    assert main(["pareto", str(tmp_path), "--out", str(out), "--plotlyjs", "cdn"]) == 0
    html = out.read_text()
    assert "Pareto frontier" in html and "switching w=7" in html
    printed = capsys.readouterr()
    assert "5 points" in printed.err and "*" in printed.out


@pytest.mark.parametrize("args, message", [
    (["--x", "is"], "--x"),
    (["--y", "ts"], "--y"),
    (["--plotlyjs", "web"], "--plotlyjs"),
])
def test_pareto_bad_options(tmp_path, capsys, args, message):
    write_csv(tmp_path / "results.csv", sample_rows())
    assert main(["pareto", str(tmp_path / "results.csv"), "--out", str(tmp_path / "a.html"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "a.html").exists()


def test_pareto_bad_results(tmp_path, capsys):
    assert main(["pareto", str(tmp_path / "none.csv"), "--out", str(tmp_path / "a.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    rows = sample_rows()
    rows[2]["dino"] = ""
    write_csv(tmp_path / "results.csv", rows)
    assert main(["pareto", str(tmp_path), "--out", str(tmp_path / "a.html"), "--y", "dino"]) == 2
    assert "without DINO" in capsys.readouterr().err
    write_csv(tmp_path / "results.csv", [])
    assert main(["pareto", str(tmp_path), "--out", str(tmp_path / "a.html")]) == 2
    assert "no rows" in capsys.readouterr().err


def test_pareto_plots_the_judges_fidelity(tmp_path, capsys):
    rows = sample_rows()
    for k, r in enumerate(rows):
        r["concept_fidelity"], r["context_fidelity"] = k % 2, (k // 2) % 2
    write_csv(tmp_path / "results.csv", rows)
    out = tmp_path / "fidelity.html"
    assert main(["pareto", str(tmp_path), "--out", str(out), "--plotlyjs", "cdn",
                 "--x", "context_fidelity", "--y", "concept_fidelity"]) == 0
    assert "concept fidelity (world judge)" in out.read_text()
    rows[0]["concept_fidelity"] = ""
    write_csv(tmp_path / "results.csv", rows)
    assert main(["pareto", str(tmp_path), "--out", str(out), "--x", "context_fidelity",
                 "--y", "concept_fidelity"]) == 2
    assert "world model" in capsys.readouterr().err
