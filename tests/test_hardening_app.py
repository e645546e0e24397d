"""Issue 15 through the launched app: each bad request sent with gradio_client gets a clear
refusal (a message, not a 500), and the server keeps serving honest requests."""

import json

import pytest

gr = pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from .test_study_app import free_port  # noqa: E402

PROMPT = "a photo of a {} on the beach"
STEPS = 2


@pytest.fixture(scope="module")
def url(demo_dir):
    from app import build_app
    from personalize.runs.lab import Lab

    lab = Lab(str(demo_dir), try_study_model=False)
    lab.default_size = 64
    demo = build_app(lab)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False, download_files=False, ssl_verify=False)


@pytest.mark.parametrize("args,message", [
    ((PROMPT, "mixed", "{}", 0, 10 ** 9), "--steps: 1000000000 is outside [1, 150]"),
    ((PROMPT, "mixed", "{}", 2 ** 63, STEPS), f"--seed: {2 ** 63} is outside"),
    ((PROMPT, "mixed", "{}", 10 ** 400, STEPS), "a 401-digit number is outside"),
    ((PROMPT, "mixed", "{}", -1, STEPS), "is outside [0,"),          # (httpx itself refuses to send NaN)
    ((PROMPT, "mixed", '{"w_c": 1e300}', 0, STEPS), "parameter w_c: 1e+300 is outside [0.0, 15.0]"),
    (("{}" * 100_000, "mixed", "{}", 0, STEPS), "prompt: 200000 characters, over the limit of 1000"),
    ((PROMPT, "mixed", "[" * 5000 + "]" * 5000, 0, STEPS), "nested too deeply"),
])
def test_bad_generate_is_refused_with_a_message(client, args, message):
    with pytest.raises(Exception) as info:
        client.predict(*args, api_name="/generate")
    assert message in str(info.value)


def test_duplicated_samplers_are_refused(client):
    with pytest.raises(Exception) as info:
        client.predict(PROMPT, ["profusion"] * 3, "{}", 0, STEPS, api_name="/compare")
    assert "'profusion' is given more than once" in str(info.value)


def test_honest_request_still_served_and_its_card_is_json(client):
    images, card = client.predict(PROMPT, "concept", "{}", 1, STEPS, api_name="/generate")
    assert len(images) == 1 and card["steps"] == STEPS
    json.dumps(card, allow_nan=False)
