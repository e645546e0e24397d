"""The study in the launched app (`app.py --study`), driven through its web API by many
gradio_client participants at once; a restart; the admin report; refusals."""

import itertools
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

gr = pytest.importorskip("gradio")
from gradio_client import Client

from personalize.study.tasks import Study, served_folders

from .study_helpers import demo_study, fresh_copy

PASSWORD = "correct horse battery staple"
PARTICIPANTS, ANSWERS_EACH = 16, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app with a study, launched like tests/test_app.py does; can be restarted."""

    def __init__(self, model, study_dir):
        self.model, self.study_dir, self.demo = model, study_dir, None

    def start(self) -> str:
        from app import build_app
        from personalize.runs.lab import Lab

        lab = Lab(str(self.model), try_study_model=False)
        self.demo = build_app(lab, study_dir=self.study_dir)
        port = free_port()
        self.demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                         allowed_paths=lab.served_folders() + served_folders(self.study_dir))
        self.url = f"http://127.0.0.1:{port}/"
        return self.url

    def stop(self):
        self.demo.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    made = demo_study(tmp_path_factory)
    old = os.environ.get("PERSONALIZE_ADMIN_PASSWORD")
    os.environ["PERSONALIZE_ADMIN_PASSWORD"] = PASSWORD
    s = Server(made["model"], fresh_copy(made["study"], tmp_path_factory.mktemp("served") / "study"))
    s.start()
    yield s
    s.stop()
    if old is None:
        os.environ.pop("PERSONALIZE_ADMIN_PASSWORD", None)
    else:
        os.environ["PERSONALIZE_ADMIN_PASSWORD"] = old


_visitors = itertools.count(1)


def client(url) -> Client:
    """A client as a new visitor: its own address (X-Forwarded-For, which the server trusts
    from loopback as a Space trusts its proxy), so that per-client rates such as new
    participants per minute count each visitor apart."""
    # Plain http on localhost: with ssl_verify on, gradio_client builds a certificate store
    # for every request, which costs more CPU than the whole server side of this test.
    k = next(_visitors)
    return Client(url, verbose=False, download_files=False, ssl_verify=False,
                  headers={"X-Forwarded-For": f"10.1.{k // 250}.{k % 250 + 1}"})


@pytest.fixture(scope="module")
def crowd(server):
    """20 participants at once, 10 answers each: task, answer, and every 5th answer sent twice."""
    barrier = threading.Barrier(PARTICIPANTS)

    def participant(k):
        c = client(server.url)
        who = c.predict(api_name="/study_join")
        barrier.wait(timeout=120)
        done = []
        for n in range(ANSWERS_EACH):
            *images, task = c.predict(who, api_name="/study_task")
            assert task and all(img is not None for img in (images[0], images[2], images[3]))
            answers = [("1", "2", "cant_decide")[(k + n + q) % 3] for q in range(3)]
            ack = c.predict(who, task, *answers, api_name="/study_answer")
            if n % 5 == 0:   # a double click: the same answer again
                again = c.predict(who, task, *answers, api_name="/study_answer")
                assert again["answer_id"] == ack["answer_id"] and not again["stored"]
            assert task.startswith(ack["task"] + ".")                # the ticket names the task
            done.append((ack["task"], ack))
        return who, done

    with ThreadPoolExecutor(PARTICIPANTS) as pool:
        return dict(pool.map(participant, range(PARTICIPANTS)))


def test_concurrent_participants_all_stored_exactly_once(server, crowd):
    acks = [ack for done in crowd.values() for _, ack in done]
    assert len(acks) == PARTICIPANTS * ANSWERS_EACH
    assert all(a["stored"] for a in acks)
    assert len({a["answer_id"] for a in acks}) == PARTICIPANTS * ANSWERS_EACH
    for done in crowd.values():
        tasks = [t for t, _ in done]
        assert len(set(tasks)) == ANSWERS_EACH                     # never the same task twice
        assert [a["answered"] for _, a in done] == list(range(1, ANSWERS_EACH + 1))
    study = Study(server.study_dir)
    rows = study.store.answers()
    assert len(rows) == PARTICIPANTS * ANSWERS_EACH
    assert len({(r["participant"], r["task"]) for r in rows}) == len(rows)
    stored = {(r["participant"], r["task"]): r["id"] for r in rows}
    assert all(stored[(study.participant(who), t)] == a["answer_id"] for who, done in crowd.items() for t, a in done)


def test_restart_loses_no_answer(server, crowd):
    server.stop()
    url = server.start()                                           # same STUDY_DIR, a new server
    c = client(url)
    report = c.predict(PASSWORD, api_name="/study_report")
    assert report["answers"] == PARTICIPANTS * ANSWERS_EACH and report["participants"] == PARTICIPANTS
    assert sum(p["answers"] for p in report["pairs"] if p["question"] == "all") <= report["answers"]
    for p in report["pairs"]:
        assert {"wins", "losses", "ties", "win_rate", "wilson_95", "bootstrap_95"} <= set(p)
    who = sorted(crowd)[3]
    *_, task = c.predict(who, api_name="/study_task")
    assert task.split(".")[0] not in {t for t, _ in crowd[who]}    # carries on where it stopped
    assert c.predict(who, task, "1", "1", "1", api_name="/study_answer")["answered"] == ANSWERS_EACH + 1


@pytest.mark.parametrize("password", ["", "wrong", PASSWORD.upper()])
def test_wrong_or_missing_admin_password_gets_no_report(server, password):
    with pytest.raises(Exception) as info:
        client(server.url).predict(password, api_name="/study_report")
    assert "wrong or missing admin password" in str(info.value)


def test_no_password_set_closes_the_report(server, monkeypatch):
    monkeypatch.delenv("PERSONALIZE_ADMIN_PASSWORD")
    with pytest.raises(Exception) as info:
        client(server.url).predict(PASSWORD, api_name="/study_report")
    assert "no admin password is set" in str(info.value)


@pytest.mark.parametrize("task,answers,message", [
    ("t99999", ("1", "2", "1"), "unknown task 't99999'"),
    ("", ("1", "2", "1"), "unknown task ''"),
    ("t00001", ("1", "2", "1"), "not a task this study gave this participant"),
    (None, ("1", "maybe", "1"), ("answer 2 (Which image better represents the original image?): 'maybe' is "
                                 "not one of 1, 2, cant_decide")),
    (None, ("1", "2", ""), "answer 3"),
    (None, ("Can't decide", "1", "1"), "is not one of 1, 2, cant_decide"),
])
def test_unknown_task_or_bad_answer_is_refused_and_stores_nothing(server, task, answers, message):
    c = client(server.url)
    who = c.predict(api_name="/study_join")
    if task is None:
        *_, task = c.predict(who, api_name="/study_task")
    before = Study(server.study_dir).store.count()
    with pytest.raises(Exception) as info:
        c.predict(who, task, *answers, api_name="/study_answer")
    assert message in str(info.value)
    assert Study(server.study_dir).store.count() == before
