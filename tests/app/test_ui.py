"""The web UI at /ui, driven in a real headless Chromium (Playwright) against the live
service: previews while generating, cancel, an erase's progress and report.

Needs a Chromium binary; without one these tests are skipped, saying how to get it.
``LETHE_UI_SCREENSHOTS=docs`` writes the README's screenshots there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from app.client import LetheClient

CHROMIUM = (os.environ.get("LETHE_CHROMIUM") or shutil.which("chromium")
            or shutil.which("chromium-browser") or shutil.which("google-chrome"))
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # not installed: the dev extra brings it
    sync_playwright = None

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None,
    reason="the browser tests need Chromium: `apt-get install chromium` (Debian/Ubuntu) or "
           "LETHE_CHROMIUM=/path/to/chrome, and Playwright (`make install-dev`)")]


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, live_url, worker):
    page = browser.new_page(viewport={"width": 1000, "height": 1000})
    page.set_default_timeout(120_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    page.close()
    assert errors == []  # no script error on any page


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("LETHE_UI_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


def test_generate_shows_previews_then_the_image(page, live_url, shots):
    page.goto(f"{live_url}/ui/#generate")
    page.select_option("#g-model", "shapes-sd")
    page.fill("#g-prompt", "a blue triangle")
    page.fill("#g-steps", "120")
    page.fill("#g-previews", "10")
    page.fill("#g-seed", "4")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("Number(document.getElementById('g-preview').dataset.frames) >= 2")
    page.screenshot(path=str(shots / "ui-generate.png"))
    page.wait_for_selector("#g-images img")
    # Every 10 of 120 steps: 11 previews before the image (the last step is the image).
    assert int(page.get_attribute("#g-preview", "data-frames")) >= 2
    assert page.inner_text("#g-status") == "succeeded"
    assert page.get_attribute("#g-images img", "alt") == "a blue triangle (seed 4)"


def test_cancel_from_the_page_ends_the_job_canceled(page, live_url, http):
    page.goto(f"{live_url}/ui/#generate")
    page.select_option("#g-model", "tiny-sd")
    page.fill("#g-steps", "500")
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("document.getElementById('g-status').textContent"
                           ".startsWith('denoising')")
    page.get_by_role("button", name="Cancel").click()
    page.wait_for_function("document.getElementById('g-status').textContent === 'canceled'")
    newest = http.get("/jobs", params={"type": "generate", "limit": 1}).json()["data"][0]
    assert newest["params"]["steps"] == 500
    assert LetheClient(http=http).job(newest["id"]).status == "canceled"


def test_the_gallery_shows_the_keys_jobs_wherever_they_were_started(page, live_url, http):
    from tests.support import wait_job

    r = http.post("/generate", json={"prompt": "made elsewhere", "model": "tiny-sd",
                                     "steps": 1, "width": 64, "height": 64})
    job_id = r.json()["id"]
    wait_job(http, job_id)
    page.goto(f"{live_url}/ui/#gallery")  # a browser that never saw the job
    card = page.locator("#gallery .card", has_text="generate: made elsewhere — succeeded")
    card.first.wait_for()
    assert card.first.locator(f"img[alt='generate {job_id} image 0']").count() == 1


def test_erase_shows_progress_and_the_loss_then_its_report(page, live_url, shots, http):
    # For the README's screenshot, the shapes model (pictures worth showing, minutes on a
    # CPU); otherwise the tiny one (seconds).
    model, iterations = (("shapes-sd", "300") if os.environ.get("LETHE_UI_SCREENSHOTS")
                         else ("tiny-sd", "40"))
    page.goto(f"{live_url}/ui/#erase")
    page.select_option("#e-model", model)
    page.fill("#e-concepts", "red")
    page.fill("#e-iterations", iterations)
    page.fill("#e-name", "no-red-ui")
    page.get_by_role("button", name="Erase").click()
    page.wait_for_function("document.getElementById('e-status').textContent"
                           ".startsWith('training')")
    page.wait_for_selector("#e-report-title", timeout=900_000)
    page.wait_for_selector("#e-report img")
    assert "no-red-ui" in page.inner_text("#e-report-title")
    assert page.is_hidden("#key-form")  # no keys on this service: no key field
    assert "drift" in page.inner_text("#e-report")
    assert page.locator("#e-loss polyline").count() == 1  # the loss curve was drawn
    page.screenshot(path=str(shots / "ui-erase.png"), full_page=True)
    page.goto(f"{live_url}/ui/#models")
    page.wait_for_selector("#models td.child")
    assert "↳ no-red-ui" in page.inner_text("#models")  # lineage: under its base
    # Who sees it: an open service's edits are public.
    row = page.locator("#models tr", has_text="no-red-ui").inner_text()
    assert "every key" in row
    page.screenshot(path=str(shots / "ui-models.png"), full_page=True)
    LetheClient(http=http).delete_model("no-red-ui")
