"""The launched app, driven by gradio_client and by a real headless Chromium."""

import json
import re
import shutil
import socket
import threading
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPT = "a photo of a {} on the beach"
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(demo_dir):
    from app import build_app
    from personalize.runs.lab import Lab

    lab = Lab(str(demo_dir), try_study_model=False)
    lab.default_size = 64       # small images keep the browser test quick
    lab.max_upload_mb = 1       # so that the oversize test needs only a small file
    demo = build_app(lab)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                max_file_size="1mb", allowed_paths=lab.served_folders())
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    return Client(app, verbose=False)


def test_generate_endpoint(client):
    images, card = client.predict(PROMPT, "mixed", json.dumps({"w_s": 2.0}), 3, STEPS, api_name="/generate")
    assert len(images) == 1 and Path(images[0]["image"]).is_file()
    assert card["sampler"] == "mixed" and card["params"] == {"w_c": 3.5, "w_s": 2.0}
    assert card["seed"] == 3 and card["steps"] == STEPS
    assert card["denoiser_rows"] == 3 * STEPS
    assert card["prompts"]["concept"] == "a photo of a sks dog on the beach"
    for key in ("is", "ts", "ts_class"):
        assert isinstance(card[key], float) and -1 <= card[key] <= 1
    assert card["metrics_random"] is True  # offline: random-weight CLIP, labelled


def test_compare_endpoint(client):
    images, cards = client.predict(PROMPT, ["concept", "switching", "mixed"], "{}", 1, STEPS,
                                   api_name="/compare")
    assert [c["sampler"] for c in cards] == ["concept", "switching", "mixed"]
    assert len(images) == 3
    assert [c["denoiser_rows"] for c in cards] == [2 * STEPS, 2 * STEPS, 3 * STEPS]
    assert all(c["seed"] == 1 for c in cards)


@pytest.mark.parametrize("args,message", [
    ((PROMPT, "fancy", "{}", 0, STEPS), "unknown sampler 'fancy'"),
    (("a photo of a dog", "mixed", "{}", 0, STEPS), "has no placeholder"),
    ((PROMPT, "mixed", "{not json", 0, STEPS), "parameters: not valid JSON"),
    ((PROMPT, "switching", '{"t_sw": 99}', 0, STEPS), "parameter t_sw: 99 is outside [0, 4]"),
])
def test_bad_input_is_a_clear_error(client, args, message):
    with pytest.raises(Exception, match=None) as info:
        client.predict(*args, api_name="/generate")
    assert message in str(info.value)


def test_two_users_get_their_own_results(app):
    results = {}

    def user(name, prompt):
        results[name] = Client(app, verbose=False).predict(prompt, "concept", "{}", 0, STEPS, api_name="/generate")

    threads = [threading.Thread(target=user, args=("beach", "a {} on the beach")),
               threading.Thread(target=user, args=("snow", "a {} in the snow"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results["beach"][1]["prompts"]["concept"] == "a sks dog on the beach"
    assert results["snow"][1]["prompts"]["concept"] == "a sks dog in the snow"
    assert results["beach"][0][0]["image"] != results["snow"][0][0]["image"]


# ---------------------------------------------------------------------------------------
# A real browser


@pytest.fixture(scope="module")
def page(app):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(app)
        page.wait_for_selector("#generate", timeout=60_000)
        yield page
        browser.close()


def shot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def set_steps(page, steps):
    page.get_by_text("Run settings").click()
    box = page.locator("#steps input[type=number]")
    box.fill(str(steps))
    box.press("Tab")


def choose_sampler(page, name):
    box = page.locator("#sampler input")
    box.click()
    box.fill(name)
    box.press("Enter")
    page.wait_for_timeout(500)


def test_page_tabs_are_labelled_by_what_they_hold(page):
    # A non-tab child of gr.Tabs (a gr.State) once shifted every later tab: Compare showed as Explore.
    tabs = page.locator("button[role=tab]")
    assert [t.inner_text() for t in tabs.all()] == ["Explore", "Compare", "Concept", "Train", "Guide"]
    tabs.nth(1).click()
    page.locator("#compare").wait_for(timeout=30_000)
    assert page.locator("#compare").is_visible() and not page.locator("#generate").is_visible()
    tabs.nth(0).click()
    page.locator("#generate").wait_for(timeout=30_000)


def test_page_generate_streams_image_and_lands_on_chart(page):
    assert "offline demo model" in page.locator("#banner").inner_text()
    set_steps(page, 6)
    page.click("#generate")
    page.wait_for_selector("#img-chosen img", timeout=120_000)
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')", timeout=120_000)
    chart_points = page.locator("#chart .scatterlayer .point")
    chart_points.first.wait_for(timeout=30_000)
    assert chart_points.count() >= 1
    for end in ("#img-concept img", "#img-superclass img"):  # the two ends, at the same seed
        assert page.locator(end).count() == 1
    shot(page, "explore_mixed")


def test_page_masked_runs_on_choosing_it_and_overlays_its_mask(page):
    choose_sampler(page, "masked")  # choosing a sampler runs it
    page.wait_for_function("document.querySelector('#img-chosen img') && "
                           "document.querySelector('#img-chosen img').alt.includes('masked sampling') && "
                           "document.querySelector('#status').innerText.includes('Done')", timeout=120_000)
    page.locator("#mask-toggle input").check()
    page.wait_for_function("document.querySelector('#img-chosen img').alt.includes('mask in red')", timeout=30_000)
    page.locator("#mask-toggle input").uncheck()
    shot(page, "explore_masked")


def shows_message(page, text):
    """Whether the page's text shows `text` (a string or a compiled pattern) within a minute."""
    try:
        page.get_by_text(text).last.wait_for(timeout=60_000)
    except Exception:
        return False
    body = page.inner_text("body")
    return bool(text.search(body)) if isinstance(text, re.Pattern) else text in body


def test_page_bad_input_shows_message_and_keeps_serving(page, tmp_path):
    prompt = page.locator("#prompt input, #prompt textarea").first
    prompt.fill("")
    page.click("#generate")
    assert shows_message(page, "the prompt template is empty")
    prompt.fill("a photo of a dog")
    page.click("#generate")
    assert shows_message(page, "'a photo of a dog' has no placeholder; mark where the concept goes with {}, V* or <V*>")
    shot(page, "bad_prompt")

    page.get_by_role("tab", name="Concept").click()
    bad = tmp_path / "concept.ckpt"
    bad.write_bytes(b"not a safetensors file")
    page.locator("#concept-upload input[type=file]").set_input_files(str(bad))
    shot(page, "bad_upload_type")
    assert shows_message(page, re.compile(r"Only \.safetensors allowed|only \.safetensors files can be uploaded"))
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (2 * 2 ** 20))
    page.locator("#concept-upload input[type=file]").set_input_files(str(big))
    shot(page, "bad_upload_size")
    assert shows_message(page, re.compile(r"1 ?MB", re.IGNORECASE))

    page.get_by_role("tab", name="Explore").first.click()
    prompt.fill(PROMPT)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Done')", timeout=120_000)


def test_page_history_reloads_into_the_sliders(page):
    page.get_by_role("tab", name="Explore").first.click()
    page.get_by_text("History", exact=True).click()
    # the table's visible text (its <tbody> rows are a hidden measuring copy in Gradio 6)
    first_row = re.compile(r"\n1\n(masked|mixed|concept)\n")
    # the accordion renders the table after the click: wait for it to exist, then for its row
    page.wait_for_function("(re) => { const h = document.querySelector('#history');"
                           " return h !== null && new RegExp(re).test(h.innerText); }",
                           arg=first_row.pattern, timeout=30_000)
    sampler = first_row.search(page.locator("#history").inner_text()).group(1)
    choose_sampler(page, "switching" if sampler != "switching" else "concept")
    page.get_by_label("Run #").fill("1")
    page.get_by_text("Load run into the sliders").click()
    page.wait_for_function(f"document.querySelector('#sampler input').value === '{sampler}'", timeout=30_000)
