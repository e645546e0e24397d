"""The Train tab driven in a real headless Chromium on the demo model: upload photos, start
a short run, watch its progress, stop it, and the next Explore run uses the concept."""

from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from tests.test_app import ARTIFACTS, CHROMIUM, free_port  # noqa: E402
from tests.test_train_tab import photos  # noqa: E402,F401  (the same three star photos)


@pytest.fixture(scope="module")
def page(demo_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from app import build_app
    from personalize.runs.lab import Lab

    lab = Lab(str(demo_dir), try_study_model=False)
    lab.default_size = 64
    demo = build_app(lab)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=lab.served_folders())
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#generate", timeout=120_000)
        yield page
        browser.close()
    demo.close()


def text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def wait_text(page, selector: str, needle: str, timeout_s: float):
    try:
        page.wait_for_function(
            "([s, t]) => { const e = document.querySelector(s); return e && e.innerText.includes(t); }",
            arg=[selector, needle], timeout=timeout_s * 1000)
    except Exception:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "train_failed.png"), full_page=True)
        raise AssertionError(f"{selector} never showed {needle!r}; it shows {text(page, selector)!r}") from None


def test_upload_train_see_progress_stop_and_explore_uses_the_concept(page, photos):
    page.get_by_role("tab", name="Train").click()
    page.locator("#train-photos input[type=file]").set_input_files(photos)
    for name in ("star_0", "star_1", "star_2"):   # the page splits a name from its suffix
        wait_text(page, "#train-photos", name, 60)
    box = page.locator("#train-method input")
    box.click()
    box.fill("lora")
    box.press("Enter")
    steps = page.locator("#train-steps input[type=number]")
    steps.fill("400")       # far more than the test waits for: Stop has to end it
    steps.press("Enter")
    page.locator("#train").click()

    wait_text(page, "#train-status", "Step ", 180)       # the progress line: loss, steps/s, time left
    line = text(page, "#train-status")
    assert "of 400: loss" in line and "steps/s" in line
    page.locator("#train-stop").click()
    wait_text(page, "#train-status", "Stopped after", 120)
    assert "is now your concept" in text(page, "#train-status")
    folder = page.locator("#train-folder textarea, #train-folder input").first.input_value()
    assert folder and Path(folder, "concept.json").is_file()
    assert sorted(p.name for p in Path(folder, "references").iterdir()) == [Path(p).name for p in photos]

    # the next Explore run samples with it: its run card names the trained folder
    page.get_by_role("tab", name="Explore").click()
    page.get_by_text("Concept references and background curves").click()
    page.wait_for_function("() => document.querySelectorAll('#references img').length === 3", timeout=30_000)
    page.locator("#generate").click()
    wait_text(page, "#status", "Done", 180)
    page.locator("#card-box").get_by_text("Run card and downloads").click()
    wait_text(page, "#card-box", Path(folder).name, 30)
    assert "sks star" in text(page, "#card-box")
