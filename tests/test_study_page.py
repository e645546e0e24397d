"""The Study tab as a participant sees it, in a real headless Chromium: three tasks
answered one after the other, the count advancing, the original and the two generated
images shown at one size, and the end message."""

import json
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")

from personalize.study.tasks import Study, served_folders  # noqa: E402
from tests.study_helpers import demo_study, fresh_copy  # noqa: E402
from tests.test_app import ARTIFACTS, CHROMIUM, free_port  # noqa: E402

TASKS = 3
IMAGES = ("#study-reference", "#study-image-1", "#study-image-2")
# The picture's size on screen: an <img> box scaled by object-fit: contain (or not scaled).
SHOWN = """(sel) => {
    const i = document.querySelector(sel + ' img');
    if (!i || !i.complete || !i.naturalWidth) return null;
    const r = i.getBoundingClientRect();
    const fit = getComputedStyle(i).objectFit === 'contain'
        ? Math.min(r.width / i.naturalWidth, r.height / i.naturalHeight) : null;
    return fit === null ? [r.width, r.height, i.naturalWidth, i.naturalHeight]
                        : [i.naturalWidth * fit, i.naturalHeight * fit, i.naturalWidth, i.naturalHeight];
}"""


def launch(tmp_path_factory, css):
    from app import CSS, build_app
    from personalize.runs.lab import Lab

    made = demo_study(tmp_path_factory)
    folder = fresh_copy(made["study"], tmp_path_factory.mktemp("page-study") / "study")
    data = json.loads((folder / "tasks.json").read_text())
    data["tasks"] = data["tasks"][:TASKS]     # a short study: the participant can finish it
    (folder / "tasks.json").write_text(json.dumps(data))
    lab = Lab(str(made["model"]), try_study_model=False)
    demo = build_app(lab, study_dir=folder)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=lab.served_folders() + served_folders(folder), css=CSS if css else None)
    return demo, f"http://127.0.0.1:{port}/", folder


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        yield b
        b.close()


def open_study(browser, url):
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    page.goto(url)
    page.get_by_role("tab", name="Study").click()
    page.wait_for_function("() => (document.querySelector('#study-progress') || {}).innerText?.includes('Task 1 of')",
                           timeout=120_000)
    return page


def shown_sizes(page) -> list:
    page.wait_for_function(f"() => {json.dumps(IMAGES)}.every(s => ({SHOWN})(s) !== null)", timeout=60_000)
    return [page.evaluate(SHOWN, s) for s in IMAGES]


def test_a_participant_answers_three_tasks_on_images_of_one_size(browser, tmp_path_factory):
    demo, url, folder = launch(tmp_path_factory, css=True)
    try:
        page = open_study(browser, url)
        for k in range(1, TASKS + 1):
            progress = page.locator("#study-progress").inner_text()
            assert f"Task {k} of {TASKS} (you have answered {k - 1})" in progress
            sizes = shown_sizes(page)
            assert sizes[0][2:] != sizes[1][2:], "the demo's original and generated images differ in pixels"
            for w, h, *_ in sizes[1:]:
                assert abs(w - sizes[0][0]) <= 2 and abs(h - sizes[0][1]) <= 2, sizes
            for q in page.locator("[id^=study-q-]").all():
                q.get_by_label("1", exact=True).check()
            page.locator("#study-submit").click()
            expect = f"Task {k + 1} of" if k < TASKS else f"You have answered all {TASKS} tasks"
            try:
                page.wait_for_function("(t) => document.querySelector('#study-progress').innerText.includes(t)",
                                       arg=expect, timeout=60_000)
            except Exception:
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "study_failed.png"), full_page=True)
                raise
        assert "Thank you" in page.locator("#study-progress").inner_text()
        answers = Study(folder).store.answers()
        assert len(answers) == TASKS and len({a["participant"] for a in answers}) == 1
        assert all(a[k] == "1" for a in answers for k in ("q_ts", "q_is", "q_all"))
    finally:
        demo.close()
