"""A real browser (system Chromium driven by Playwright) plays one round of the demo."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ui_helpers import EXAMPLES, running_demo

CHROMIUM = os.environ.get("CLOT_CHROMIUM", "/usr/bin/chromium")
# Headless as root in a container, with the calls that a blocked network would hang on turned off.
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"no Chromium at {CHROMIUM}: `apt-get install chromium` (CI installs it)"),
]


@pytest.fixture(scope="module")
def page(tiny_dir, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with running_demo(tiny_dir, tmp_path_factory.mktemp("browser-adapters")) as (_, url), \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1100})
        page.goto(url, wait_until="networkidle")
        yield page
        browser.close()


def test_upload_condition_generate_shows_candidates_and_meme(page, artifacts):
    from playwright.sync_api import expect

    page.locator("#i2t-image input[type=file]").set_input_files(str(EXAMPLES / "cat.jpg"))
    expect(page.locator("#i2t-image img")).to_be_visible(timeout=20_000)
    page.locator("#i2t-conditions textarea").fill("umbrella")
    page.locator("#i2t-generate").click()

    cards = page.locator("#i2t-cards .clot-candidate")
    expect(cards).to_have_count(4, timeout=60_000)  # the default number of candidates
    expect(page.locator("#i2t-cards .clot-chosen")).to_have_count(1)
    expect(page.locator("#i2t-cards")).to_contain_text("umbrella")  # the condition is shown on its card
    expect(page.locator("#i2t-cards")).to_contain_text("rank score")
    meme = page.locator("#i2t-meme img")
    expect(meme).to_be_visible(timeout=20_000)
    assert meme.evaluate("img => img.naturalWidth") > 0
    expect(page.locator("#i2t-download")).to_be_visible()
    page.screenshot(path=str(artifacts / "ui-browser-i2t.png"), full_page=True)

    first_text = page.locator("#i2t-cards .clot-text").first.inner_text()
    page.locator("#i2t-regenerate").click()  # same inputs, a new random seed: new answers
    expect(page.locator("#i2t-cards .clot-text").first).not_to_have_text(first_text, timeout=60_000)
    expect(page.locator("#i2t-cards .clot-candidate")).to_have_count(4)

    page.locator("#i2t-clear").click()
    expect(page.locator("#i2t-cards .clot-candidate")).to_have_count(0, timeout=20_000)
    expect(page.locator("#i2t-conditions textarea")).to_have_value("")
    expect(page.locator("#i2t-download")).to_be_hidden()


def test_an_error_shows_as_a_message_and_the_page_keeps_working(page, artifacts):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Text → Text", exact=True).click()
    page.locator("#t2t-generate").click()
    expect(page.locator(".toast-body").first).to_contain_text("needs a question", timeout=20_000)

    page.locator("#t2t-text textarea").fill("What is the worst thing to say at a job interview?")
    page.locator("#t2t-dice").click()
    expect(page.locator("#t2t-conditions textarea")).not_to_have_value("", timeout=20_000)
    page.locator("#t2t-generate").click()
    expect(page.locator("#t2t-cards .clot-candidate")).to_have_count(4, timeout=60_000)
    page.screenshot(path=str(artifacts / "ui-browser-t2t.png"), full_page=True)
