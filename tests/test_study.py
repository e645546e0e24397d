"""`study`: tasks built from a sweep (sides randomised and recorded, attention checks,
repeats), answers stored once and kept across restarts, the report, the command line."""

import json
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from personalize.cli import main
from personalize.errors import UserError
from personalize.evaluation.sweep import RESULTS, read_rows
from personalize.study.build import build_study, parse_pairs
from personalize.study.report import make_report
from personalize.study.store import Store
from personalize.study.tasks import Study

from .study_helpers import demo_study, fresh_copy

SAMPLERS = ("concept", "mixed", "switching")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return demo_study(tmp_path_factory)


@pytest.fixture(scope="module")
def built(made, tmp_path_factory):
    """Three pairs from the demo sweep, with repeats and attention checks."""
    out = tmp_path_factory.mktemp("built") / "study"
    data = build_study(made["sweep"], parse_pairs("mixed:concept,mixed:switching,switching:concept"), out,
                       attention_checks=3, repeats=4, seed=5)
    return out, data


@pytest.fixture
def study(made, tmp_path):
    return Study(fresh_copy(made["study"], tmp_path / "study"))


def pixels(data: bytes) -> bytes:
    """An image file's decoded pixels (study media carry a comment of their own)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB").tobytes() + repr(im.size).encode()


def sweep_images(sweep: Path) -> dict:
    """(concept, prompt, seed, image, sampler) -> image bytes."""
    return {(r["concept"], r["prompt"], int(r["seed"]), int(r["image"]), r["sampler"]):
            (sweep / r["image_path"]).read_bytes() for r in read_rows(sweep / RESULTS)}


def test_demo_is_a_ready_study(made, tmp_path):
    study = Study(made["study"], db=tmp_path / "answers.sqlite")   # the shared demo stays read-only
    kinds = Counter(t["kind"] for t in study.order)
    assert kinds == {"pair": 16, "repeat": 2, "attention": 2}
    assert study.data["pairs"] == [["mixed", "concept"], ["mixed", "switching"]]
    assert study.data["random_weights"] is True
    for t in study.order:
        for key in ("reference", "image_1", "image_2"):
            path = made["study"] / t[key]
            assert path.is_file() and path.parent.name == "media"
            assert not any(s in path.name for s in SAMPLERS)   # file names do not unblind
        assert "{}" not in t["text"] and "sks" not in t["text"] and "dog" in t["text"]


def test_sides_are_randomised_balanced_and_recorded(made, built):
    out, data = built
    images = sweep_images(made["sweep"])
    pairs = [t for t in data["tasks"] if t["kind"] == "pair"]
    assert len(pairs) == 3 * 8                            # 4 prompts x 2 seeds per pair
    for a, b in (("mixed", "concept"), ("mixed", "switching"), ("switching", "concept")):
        mine = [t for t in pairs if t["pair"] == [a, b]]
        first = Counter(t["method_1"] for t in mine)
        assert abs(first[a] - first[b]) <= 1 and first[a] + first[b] == len(mine)
        for t in mine:                                    # the recorded side shows that method's image
            assert {t["method_1"], t["method_2"]} == {a, b}
            for side in ("1", "2"):
                key = (t["concept"], t["prompt"], t["seed"], t["image"], t[f"method_{side}"])
                assert pixels((out / t[f"image_{side}"]).read_bytes()) == pixels(images[key])
    assert len({t["id"] for t in data["tasks"]}) == len(data["tasks"])
    # the task order says nothing about the pair
    assert [t["pair"] for t in pairs[:8]] != [pairs[0]["pair"]] * 8


def test_repeats_flip_sides_and_attention_checks_have_one_answer(made, built):
    out, data = built
    tasks = {t["id"]: t for t in data["tasks"]}
    repeats = [t for t in data["tasks"] if t["kind"] == "repeat"]
    assert len(repeats) == 4 and len({t["repeat_of"] for t in repeats}) == 4
    for r in repeats:
        o = tasks[r["repeat_of"]]
        assert o["kind"] == "pair" and r["pair"] == o["pair"]
        assert (r["method_1"], r["method_2"]) == (o["method_2"], o["method_1"])
        assert pixels((out / r["image_1"]).read_bytes()) == pixels((out / o["image_2"]).read_bytes())
        assert pixels((out / r["image_2"]).read_bytes()) == pixels((out / o["image_1"]).read_bytes())
        assert r["image_1"] != o["image_2"]           # a fresh file for every occurrence
    checks = [t for t in data["tasks"] if t["kind"] == "attention"]
    assert len(checks) == 3
    real = {pixels(p.read_bytes()) for p in (Path(made["model"]) / "references").iterdir()}
    for c in checks:
        side = c["expected"]["is"]
        other = "2" if side == "1" else "1"
        assert c[f"method_{side}"] == "real" and pixels((out / c[f"image_{side}"]).read_bytes()) in real
        assert c[f"method_{other}"] == "blank"


@pytest.mark.parametrize("pairs,message", [
    ("mixed", "is not A:B"),
    ("mixed:mixed", "compares a method with itself"),
    ("mixed:concept,concept:mixed", "given twice"),
    ("mixed:Photo Swap", "is not a method"),
    ("", "give method pairs"),
])
def test_bad_pairs(pairs, message):
    with pytest.raises(UserError, match=message):
        parse_pairs(pairs)


def test_point_syntax_and_unknown_methods(made, tmp_path):
    assert parse_pairs("mixed[w_c=3.5,w_s=3.5]:concept") == [("mixed[w_c=3.5,w_s=3.5]", "concept")]
    data = build_study(made["sweep"], parse_pairs("mixed[w_c=3.5,w_s=3.5]:concept"), tmp_path / "a", per_pair=3)
    assert len(data["tasks"]) == 3 and data["methods"]["mixed[w_c=3.5,w_s=3.5]"]["params"] == {"w_c": 3.5, "w_s": 3.5}
    with pytest.raises(UserError, match="has no images of 'photoswap'; it has concept, mixed, switching"):
        build_study(made["sweep"], [("mixed", "photoswap")], tmp_path / "b")
    with pytest.raises(UserError, match="has no point 'w_s=9'"):
        build_study(made["sweep"], [("mixed[w_s=9]", "concept")], tmp_path / "c")
    with pytest.raises(UserError, match="already a study"):
        build_study(made["sweep"], [("mixed", "concept")], tmp_path / "a")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_store_is_wal_and_counts_a_resubmission_once(study):
    with sqlite3.connect(study.store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    task = study.next_task("ann")
    first = study.answer("ann", task.task, ["1", "2", "cant_decide"])
    again = study.answer("ann", task.task, ["2", "2", "2"])
    assert first["stored"] and not again["stored"]
    assert again["answer_id"] == first["answer_id"] and again["answers"] == {"ts": "1", "is": "2", "all": "cant_decide"}
    assert study.store.count() == 1
    row = study.store.answers()[0]
    t = study.tasks[task.task]
    assert (row["method_1"], row["method_2"]) == (t["method_1"], t["method_2"])   # side order recorded
    assert row["created"].endswith("Z")


def test_bad_answers_store_nothing(study):
    task = study.next_task("ann").task
    for args, message in [(("ann", "t99999", ["1", "1", "1"]), "unknown task 't99999'"),
                          (("ann", task, ["1", "3", "1"]), "answer 2 .*'3' is not one of 1, 2, cant_decide"),
                          (("ann", task, ["1", "", "1"]), "answer 2 .* is missing"),
                          (("ann", task, ["1", "1"]), "give 3 answers"),
                          (("  ", task, ["1", "1", "1"]), "participant id: empty")]:
        with pytest.raises(UserError, match=message):
            study.answer(*args)
    assert study.store.count() == 0


def test_restart_keeps_every_answer(study):
    for who in ("ann", "bob"):
        for _ in range(5):
            study.answer(who, study.next_task(who).task, ["1", "1", "2"])
    again = Study(study.folder)                      # a new process would see the same file
    assert again.store.count() == 10
    assert again.progress("ann") == 5 and again.next_task("ann").answered == 5


def test_a_participant_gets_each_task_once_checks_and_repeats_in_turn(study):
    seen = []
    while (task := study.next_task("ann")) is not None:
        seen.append(task.task)
        study.answer("ann", task.task, ["1", "2", "1"])
    assert sorted(seen) == sorted(study.tasks) and study.next_task("bob") is not None
    kinds = [study.tasks[t]["kind"] for t in seen]
    assert kinds[5] == "attention" and kinds[11] == "attention"     # every 6th while any is left
    for k, t in enumerate(seen):
        if kinds[k] == "repeat":
            assert seen.index(study.tasks[t]["repeat_of"]) <= k - 3  # after the original, not right after


def test_another_study_answers_file_is_refused(study, tmp_path):
    with pytest.raises(UserError, match="belongs to another study"):
        Store(study.store.path, "some-other-study")


def answer_all(study, who, choose):
    """Answer every task of `study` as `who`; `choose(task)` gives the three answers."""
    while (task := study.next_task(who)) is not None:
        study.answer(who, task.task, choose(study.tasks[task.task]))


def side_of(task, method):
    return "1" if task["method_1"] == method else "2"


def test_report_counts_by_hand(study):
    # ann: always mixed, except "Can't decide" on the IS question; passes the checks.
    answer_all(study, "ann", lambda t: [side_of(t, "mixed"), "cant_decide" if t["pair"] else side_of(t, "real"),
                                        side_of(t, "mixed")] if t["pair"] else ["1", side_of(t, "real"), "1"])
    # bob: always image 1, fails the attention check where the real image is image 2.
    answer_all(study, "bob", lambda t: ["1", "1", "1"])
    r = study.report(resamples=200)
    assert r["answers"] == 40 and r["participants"] == 2
    assert r["excluded"] == [{"participant": "bob", "reason": "failed 1 of 2 attention check(s)"}]
    assert r["included"] == {"answers": 20, "participants": 1}
    by = {(p["a"], p["b"], p["question"]): p for p in r["pairs"]}
    ts = by[("mixed", "concept", "ts")]
    assert (ts["wins"], ts["losses"], ts["ties"], ts["win_rate"]) == (8, 0, 0, 1.0)
    assert ts["wilson_95"] == [pytest.approx(0.6756, abs=1e-4), 1.0]             # Wilson of 8 of 8
    assert ts["bootstrap_95"] == [1.0, 1.0]
    iq = by[("mixed", "switching", "is")]
    assert (iq["wins"], iq["ties"], iq["win_rate"], iq["tie_share"]) == (0, 8, 0.5, 1.0)
    assert iq["wilson_95"] == [None, None]                                       # no decisive answers
    assert r["bradley_terry"]["all"]["methods"][0]["method"] == "mixed"
    assert r["self_consistency"]["ts"] == {"repeats": 2, "same": 2, "share": 1.0}
    # with bob counted (by allowing one failure): image 1 is chosen far more often
    both = study.report(resamples=200, max_failures=1)
    assert both["included"]["participants"] == 2
    assert both["position_bias"]["ts"]["share_image_1"] > 0.7
    assert study.report(resamples=200, exclude=["ann"])["included"] == {"answers": 0, "participants": 0}


def test_report_of_a_study_without_answers():
    r = make_report({"tasks": [], "pairs": [["a", "b"]], "methods": {"a": {}, "b": {}}}, [], resamples=10)
    assert r["answers"] == 0 and r["pairs"][0]["win_rate"] is None and r["pairs"][0]["bootstrap_95"] == [None, None]


def test_cli_report_export_and_bad_input(study, tmp_path, capsys):
    answer_all(study, "ann", lambda t: ["1", "2", "cant_decide"])
    assert main(["study", "report", str(study.folder), "--resamples", "100"]) == 0
    text = capsys.readouterr().out
    assert "mixed vs concept" in text and "Table 1" in text and "Bradley-Terry" in text
    assert main(["study", "report", str(study.folder), "--json", "--resamples", "100"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["answers"] == 20 and len(r["pairs"]) == 6
    assert main(["study", "export", str(study.folder), "--out", str(tmp_path / "a.csv")]) == 0
    assert "20 answers" in capsys.readouterr().err
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert len(lines) == 21 and lines[0].startswith("id,participant,task,method_1,method_2,q_ts,q_is,q_all")

    for argv, message in [
        (["study", "report", str(tmp_path)], "is not a study folder"),
        (["study", "build", str(tmp_path), "--pairs", "mixed:concept", "--out", str(tmp_path / "x")],
         "is not a sweep folder"),
        (["study", "build", str(study.folder), "--pairs", "mixed", "--out", str(tmp_path / "x")], "is not A:B"),
        (["study", "report", str(study.folder), "--resamples", "0"], "--resamples"),
        (["study", "frobnicate"], "invalid choice"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
