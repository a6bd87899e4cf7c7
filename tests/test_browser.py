"""A real browser (system Chromium driven by Playwright) plays one round of the demo."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from conftest import make_adapter
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
def demo(tiny_dir, tmp_path_factory):
    """(browser, url, engine) of the app on the tiny model."""
    from playwright.sync_api import sync_playwright

    with running_demo(tiny_dir, tmp_path_factory.mktemp("browser-adapters")) as (engine, url), \
            sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser, url, engine
        browser.close()


@pytest.fixture(scope="module")
def page(demo):
    browser, url, _ = demo
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    page.goto(url, wait_until="networkidle")
    return page


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


# Records, on every change of the page, the live texts, the Generate button's state and whether a final
# result is shown: what happened in between is checked afterwards, without racing the browser.
RECORD = """([cards, button]) => {
  window.clotRecord = [];
  const note = () => window.clotRecord.push({
    live: [...document.querySelectorAll(`${cards} .clot-live-text`)].map((e) => e.textContent),
    disabled: document.querySelector(button).disabled,
    final: document.querySelectorAll(`${cards} .clot-chosen`).length > 0,
  });
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                     attributes: true});
}"""


def shown_seed(page, key: str) -> int:
    from playwright.sync_api import expect

    cards = page.locator(f"#{key}-cards")
    expect(cards.locator(".clot-chosen")).to_have_count(1, timeout=300_000)
    expect(cards).to_contain_text(re.compile(r"seed \d+"), timeout=60_000)  # the header, not a live view
    return int(re.search(r"seed (\d+)", cards.inner_text()).group(1))


def test_seed_stays_random_with_the_sampling_accordion_open(page):
    """Opening the accordion used to turn the empty seed box into 0: every answer the same."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Text → Text", exact=True).click()
    page.locator("#t2t-text textarea").fill("Why do penguins wear tuxedos?")
    page.locator("#t2t-sampling").get_by_text("Sampling").click()
    expect(page.locator("#t2t-seed textarea, #t2t-seed input").first).to_have_value("")
    seeds = []
    for _ in range(2):
        page.locator("#t2t-generate").click()
        expect(page.locator("#t2t-cards .clot-chosen")).to_have_count(0, timeout=120_000)  # the old result goes
        seeds.append(shown_seed(page, "t2t"))
    assert seeds[0] != seeds[1]
    expect(page.locator("#t2t-seed textarea, #t2t-seed input").first).to_have_value("")


def test_candidates_stream_in_while_generate_is_locked(page, artifacts):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Text → Text", exact=True).click()
    page.locator("#t2t-text textarea").fill("Invent an Olympic sport that nobody would watch.")
    page.evaluate(RECORD, ["#t2t-cards", "#t2t-generate"])
    page.locator("#t2t-generate").click()
    # Every change of the page is on the record: wait there (not on the screen, where the previous
    # test's result still shows at first) for the old result to go, a new one to come and the unlock.
    page.wait_for_function("""() => {
      const record = window.clotRecord, cleared = record.findIndex((r) => !r.final);
      return cleared >= 0 && record.slice(cleared).some((r) => r.final) && !record[record.length - 1].disabled;
    }""", timeout=300_000)
    record = page.evaluate("window.clotRecord")
    cleared = next(i for i, r in enumerate(record) if not r["final"])  # the previous test's result goes first
    first_final = next(i for i, r in enumerate(record) if r["final"] and i > cleared)
    live = [r["live"] for r in record[cleared:first_final] if r["live"]]
    lengths = [sum(map(len, texts)) for texts in live]
    assert len(live[-1]) == 4  # every row of the batch is shown, not just the first
    assert len(set(lengths)) >= 2 and lengths[-1] > lengths[0]  # the text grew before the final result
    assert any(r["disabled"] for r in record[cleared:first_final])  # locked while running
    page.screenshot(path=str(artifacts / "ui-browser-streamed.png"), full_page=True)


def test_adapter_published_while_the_page_is_open_is_listed_after_a_reload(demo, page):
    from playwright.sync_api import expect

    _, _, engine = demo
    make_adapter(engine, "late-wit", seed=5)
    page.reload(wait_until="networkidle")
    page.locator("#adapter input").click()
    expect(page.get_by_role("option", name=re.compile("late-wit"))).to_be_visible(timeout=20_000)
    page.keyboard.press("Escape")


def test_every_tab_is_reachable_on_a_phone(demo):
    from playwright.sync_api import expect

    browser, url, _ = demo
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(url, wait_until="networkidle")
    for name, inside in [("Image → Text", "#i2t-image"), ("Image + Text → Text", "#it2t-text"),
                         ("Text → Text", "#t2t-text"), ("Arena", "#arena-battle"), ("Leaderboard", None)]:
        tab = phone.locator(".tab-wrapper [role=tab], .tab-wrapper .overflow-dropdown button").filter(
            has_text=re.compile(f"^{re.escape(name)}$"))
        expect(tab).to_be_visible()
        box = tab.bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 390  # on screen, not scrolled away
        tab.click()
        if inside:
            expect(phone.locator(inside)).to_be_visible()
    phone.close()


def test_api_page_opens_from_its_link(demo):
    from playwright.sync_api import expect

    browser, url, _ = demo
    api = browser.new_page(viewport={"width": 1280, "height": 1000})
    api.goto(url + "?view=api", wait_until="networkidle")
    expect(api.get_by_text("/text_to_text").first).to_be_visible(timeout=20_000)
    expect(api.get_by_text("handle_file('cat.jpg')").first).to_be_visible()
    api.close()
