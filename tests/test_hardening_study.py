"""Issue 15, the study: tokens and tickets signed by the server, `hf:` ids only from a
login, fresh media per task, a CSV that no spreadsheet runs, and a guarded report."""

import csv
import hashlib
import time
from collections import Counter

import gradio as gr
import pytest

from personalize.errors import UserError
from personalize.study import tasks as study_tasks
from personalize.study.tasks import Study
from ui.study_tab import participant_id

from .study_helpers import demo_study, fresh_copy

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return demo_study(tmp_path_factory)


@pytest.fixture
def study(made, tmp_path):
    return Study(fresh_copy(made["study"], tmp_path / "study"))


@pytest.mark.parametrize("token,message", [
    ("anon:alice", "not a token this study handed out"),
    ("hf:alice", "hf: ids come only from a Hugging Face login"),
    ("", "empty; ask /study_join"),
    (None, "empty; ask /study_join"),
    ("anon:" + "0" * 32 + "." + "f" * 32, "not a token this study handed out"),
])
def test_forged_participant_is_refused_and_stores_nothing(study, token, message):
    with pytest.raises(UserError, match=message):
        study.task_for(token)
    with pytest.raises(UserError, match=message):
        study.answer_ticket(token, "t00001", ["1", "1", "1"])
    assert study.store.count() == 0


def test_only_the_task_assigned_to_the_token_is_accepted(study):
    alice, mallory = study.new_participant(), study.new_participant()
    shown, ticket = study.task_for(alice)
    task = shown.task
    for who, what in ((mallory, ticket), (alice, task), (alice, task + ".0123456789abcdef")):
        with pytest.raises(UserError, match="not a task this study gave this participant"):
            study.answer_ticket(who, what, ["1", "2", "1"])
    assert study.store.count() == 0
    ack = study.answer_ticket(alice, ticket, ["1", "2", "1"])
    assert ack["stored"] and ack["task"] == task
    assert study.store.answers()[0]["participant"] == study.participant(alice)
    assert "." not in study.store.answers()[0]["participant"]      # the signature is not stored


def test_tokens_survive_a_restart_and_the_key_is_not_the_browsers(study, monkeypatch):
    token = study.new_participant()
    again = Study(study.folder)
    assert again.participant(token) == study.participant(token)
    assert study.store.meta("token_key") != study.browser_secret()   # gradio puts that one in the page
    monkeypatch.setenv("PERSONALIZE_STUDY_SECRET", "another key")
    with pytest.raises(UserError, match="not a token this study handed out"):
        again.participant(token)


def test_hf_ids_only_from_a_login(study):
    assert participant_id(study, "hf:alice", None)[0].startswith("anon:")   # typed: a new anonymous one
    profile = gr.OAuthProfile({"preferred_username": "alice", "name": "Alice", "profile": "", "picture": ""})
    assert participant_id(study, None, profile) == ("hf:alice", None)
    token = study.new_participant()
    assert participant_id(study, token, None) == (study.participant(token), token)


def test_every_task_occurrence_has_its_own_media(made, tmp_path):
    study = Study(made["study"], db=tmp_path / "answers.sqlite")   # the shared demo stays read-only
    shown = [t[k] for t in study.order for k in ("image_1", "image_2")]
    assert len(set(shown)) == len(shown)                               # names
    digests = [hashlib.sha256((study.folder / p).read_bytes()).hexdigest() for p in shown]
    assert len(set(digests)) == len(digests)                           # bytes (gradio serves by content hash)
    blanks = [t[f"image_{'2' if t['expected']['is'] == '1' else '1'}"]
              for t in study.order if t["kind"] == "attention"]
    assert len(blanks) == 2 and len(set(blanks)) == 2


def test_export_escapes_formulas(study, tmp_path):
    evil = '=HYPERLINK("http://evil.example","x")'
    for k, who in enumerate((evil, "+1", "-2", "@SUM(A1)", "anon:fine")):
        study.store.add(who, study.order[k]["id"], ("a", "b"), {"ts": "1", "is": "1", "all": "1"})
    study.export(tmp_path / "answers.csv")
    with open(tmp_path / "answers.csv", newline="", encoding="utf-8") as f:
        cells = Counter(r["participant"] for r in csv.DictReader(f))
    assert set(cells) == {"'" + evil, "'+1", "'-2", "'@SUM(A1)", "anon:fine"}


@pytest.fixture
def admin(monkeypatch):
    monkeypatch.setattr(study_tasks, "FAILURE_DELAY", 0.2)
    monkeypatch.setattr(study_tasks, "_failures", {"count": 0})
    monkeypatch.setenv("PERSONALIZE_ADMIN_PASSWORD", PASSWORD)
    return monkeypatch


def test_short_admin_password_closes_the_report(study, admin):
    admin.setenv("PERSONALIZE_ADMIN_PASSWORD", "short-pass1")
    with pytest.raises(UserError, match="shorter than 12 characters"):
        study.admin_report("short-pass1")


def test_wrong_password_waits_and_lone_surrogates_are_refused_cleanly(study, admin):
    for k, password in enumerate(("wrong", "\ud800" * 20)):
        start = time.monotonic()
        with pytest.raises(UserError, match="wrong or missing admin password"):
            study.admin_report(password)
        assert time.monotonic() - start >= 0.2 * 2 ** k               # doubled for each failure in a row
    assert study.admin_report(PASSWORD, resamples=10)["answers"] == 0
    assert study_tasks._failures["count"] == 0                         # a success resets the delay


def test_answers_over_the_web_are_rate_limited_per_participant(made, tmp_path):
    now = [0.0]
    study = Study(fresh_copy(made["study"], tmp_path / "study"), answers_per_minute=3, clock=lambda: now[0])
    alice, bob = study.new_participant(), study.new_participant()

    def answer(token):
        _, ticket = study.task_for(token)
        return study.answer_ticket(token, ticket, ["1", "2", "1"])

    for _ in range(3):
        assert answer(alice)["stored"]
    with pytest.raises(UserError, match="too many answers from one participant: at most 3 a minute"):
        answer(alice)
    assert study.store.count() == 3                       # the refused answer is not stored
    assert answer(bob)["stored"]                          # another participant has their own rate
    now[0] = 61.0
    assert answer(alice)["stored"]
    # the library's own `answer` (a script of the study's owner) is not limited
    who = "anon:" + "a" * 32
    for _ in range(5):
        study.answer(who, study.next_task(who).task, ["1", "1", "1"])
    assert study.store.count() == 5 + 5
