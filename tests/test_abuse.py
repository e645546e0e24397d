"""The abuse run: `python app.py` on the world, with a study (the one test of the README's
command and a Space's entry point as a process of its own), serves an honest client and an
honest study participant while 10 other clients send the refused requests of the hardening
tests for ABUSE_S seconds (20; `$PERSONALIZE_ABUSE_S`). Every client comes from its own
address (X-Forwarded-For from loopback, which uvicorn trusts, as a Space's proxy is
trusted): the rates are per client.

Measured: the honest client's median latency under abuse is at most 3x its unloaded
median; the server's peak RSS stays under 2x its idle RSS; every bad request gets its
refusal message (never an internal error, never a result); no answer of the honest
participant is lost. Loops are bounded by the deadline; everything stays on loopback."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from personalize.study.tasks import Study  # noqa: E402

from .study_helpers import demo_study, fresh_copy  # noqa: E402
from .test_study_app import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(__file__).parent / "artifacts"   # abuse.json: the measured figures
ABUSE_S = float(os.environ.get("PERSONALIZE_ABUSE_S", "20"))
PASSWORD = "correct horse battery staple"
PROMPT = "a {} on the beach"
STEPS = 25
ABUSERS = 10

# (endpoint, arguments, the refusal's message): the bad requests of tests/test_hardening*.py
BAD = [
    ("/generate", (PROMPT, "mixed", "{}", 0, 10 ** 9), "--steps: 1000000000 is outside"),
    ("/generate", (PROMPT, "mixed", "{}", 10 ** 400, STEPS), "a 401-digit number is outside"),
    ("/generate", (PROMPT, "mixed", '{"w_c": 1e300}', 0, STEPS), "is outside [0.0, 15.0]"),
    ("/generate", ("{}" * 100_000, "mixed", "{}", 0, STEPS), "over the limit of 1000"),
    ("/generate", (PROMPT, "mixed", "[" * 5000 + "]" * 5000, 0, STEPS), "nested too deeply"),
    ("/compare", (PROMPT, ["profusion"] * 3, "{}", 0, STEPS), "is given more than once"),
    ("/study_answer", ("hf:alice", "t00001", "1", "1", "1"), "hf: ids come only from a Hugging Face login"),
    ("/study_answer", ("anon:" + "0" * 32 + "." + "f" * 32, "t00001", "1", "1", "1"),
     "not a token this study handed out"),
    ("/study_task", ("anon:" + "1" * 32,), "not a token this study handed out"),
]
RATE_MESSAGE = "too many"          # a client over its rate: refused too


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def client(url: str, address: str) -> Client:
    return Client(url, verbose=False, download_files=False, ssl_verify=False,
                  headers={"X-Forwarded-For": address})


@pytest.fixture(scope="module")
def server(tmp_path_factory, request):
    from personalize.world.paths import shipped_world

    world = shipped_world() or request.getfixturevalue("quick_world")[0]
    study_dir = fresh_copy(demo_study(tmp_path_factory)["study"], tmp_path_factory.mktemp("abuse") / "study")
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PERSONALIZE_ADMIN_PASSWORD=PASSWORD,
               PERSONALIZE_RUNS_PER_MINUTE="120", GRADIO_ANALYTICS_ENABLED="False")
    env.pop("SPACE_ID", None)
    log = open(tmp_path_factory.mktemp("abuse-log") / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--model", str(world), "--study", str(study_dir),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            client(url, "10.0.0.9")
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise AssertionError(f"the app did not start: {Path(log.name).read_text()[-3000:]}") from None
            time.sleep(1)
    yield url, proc, study_dir
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def generate(c: Client, seed: int) -> float:
    started = time.perf_counter()
    images, card = c.predict(PROMPT, "mixed", "{}", seed, STEPS, api_name="/generate")
    assert len(images) == 1 and card["steps"] == STEPS
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def abuse_run(server):
    url, proc, study_dir = server
    honest = client(url, "10.0.0.1")
    generate(honest, 0)                                     # warm-up: model, metric model, caches
    unloaded = [generate(honest, seed) for seed in range(1, 4)]
    idle_rss = rss_kb(proc.pid)

    deadline = time.time() + ABUSE_S
    peak = [idle_rss]
    outcomes: dict[str, int] = {}
    unexpected: list[str] = []
    loaded: list[float] = []
    acks: list[dict] = []
    lock = threading.Lock()

    def watch():
        while time.time() < deadline:
            peak[0] = max(peak[0], rss_kb(proc.pid))
            time.sleep(0.2)

    def abuser(k: int):
        c = client(url, f"10.0.1.{k}")
        n = k
        while time.time() < deadline:
            endpoint, args, message = BAD[n % len(BAD)]
            n += 1
            try:
                c.predict(*args, api_name=endpoint)
                outcome = f"ANSWERED {endpoint}"
            except Exception as e:  # noqa: BLE001 - every refusal is examined below
                text = str(e)
                outcome = "refused" if message in text else "rate" if RATE_MESSAGE in text else f"{endpoint}: {text[:200]}"
            with lock:
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                if outcome not in ("refused", "rate"):
                    unexpected.append(outcome)

    def honest_client():
        seed = 100
        while time.time() < deadline:
            loaded.append(generate(honest, seed))
            seed += 1

    def participant():
        c = client(url, "10.0.0.2")
        token = c.predict(api_name="/study_join")
        while time.time() < deadline:
            *_, ticket = c.predict(token, api_name="/study_task")
            if not ticket:
                break
            acks.append(c.predict(token, ticket, "1", "2", "cant_decide", api_name="/study_answer"))
            time.sleep(3.5)                                   # a person's pace: under 20 answers a minute
        return token

    threads = [threading.Thread(target=watch), threading.Thread(target=honest_client)]
    threads += [threading.Thread(target=abuser, args=(k,)) for k in range(ABUSERS)]
    result = {}
    threads.append(threading.Thread(target=lambda: result.update(token=participant())))
    for t in threads:
        t.start()
    for t in threads:
        t.join(ABUSE_S + 120)
    assert not any(t.is_alive() for t in threads), "a client hung past the deadline"
    figures = dict(unloaded_median_s=statistics.median(unloaded), loaded_median_s=statistics.median(loaded or [0]),
                   honest_runs=len(loaded), idle_rss_mb=idle_rss / 1024, peak_rss_mb=peak[0] / 1024,
                   outcomes=outcomes, honest_answers=len(acks))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "abuse.json").write_text(json.dumps(figures, indent=2))
    return dict(unloaded=unloaded, loaded=loaded, idle_rss=idle_rss, peak_rss=peak[0], outcomes=outcomes,
                unexpected=unexpected, acks=acks, token=result["token"], study_dir=study_dir)


def test_every_bad_request_is_refused_with_its_message(abuse_run):
    assert abuse_run["unexpected"] == []
    assert abuse_run["outcomes"].get("refused", 0) >= len(BAD)


def test_honest_client_keeps_its_latency(abuse_run):
    unloaded, loaded = statistics.median(abuse_run["unloaded"]), abuse_run["loaded"]
    assert len(loaded) >= 3, loaded
    assert statistics.median(loaded) <= 3 * unloaded, (unloaded, loaded)


def test_memory_stays_bounded(abuse_run):
    assert abuse_run["peak_rss"] < 2 * abuse_run["idle_rss"], (abuse_run["idle_rss"], abuse_run["peak_rss"])


def test_no_answer_of_the_honest_participant_is_lost(abuse_run):
    acks = abuse_run["acks"]
    assert len(acks) >= 3 and all(a["stored"] for a in acks)
    study = Study(abuse_run["study_dir"])
    stored = {(r["participant"], r["task"]) for r in study.store.answers()}
    who = study.participant(abuse_run["token"])
    assert {(who, a["task"]) for a in acks} <= stored
    assert {p for p, _ in stored} == {who}                 # nothing forged got in
