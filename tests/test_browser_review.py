"""The review page in a real browser: uvicorn serving the app on a loopback port, Debian's chromium
driven by Playwright (no browser download). A reviewer enters the key once, approves one image by
click and rejects another by keyboard, and the API then reports both decisions."""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from api.main import create_app
from tests.apikit import create_role_keys
from core.db import session_scope
from core.settings import REPO_ROOT
from models import Review
from tests.fixtures.services import free_port
from tests.reviewkit import seed_batch

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = REPO_ROOT / "var" / "review-page.png"
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not shutil.which("chromium"),
                                reason="Debian's chromium is not installed (make browser)")


@pytest.fixture
def server(configure, sqlite_url) -> Iterator[str]:
    """The app under uvicorn in a thread of this process (so it shares the test's settings)."""
    import uvicorn

    configure(DATABASE_URL=sqlite_url)
    port = free_port()
    app_server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=app_server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not app_server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    app_server.should_exit = True
    thread.join(15)


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        context.close()
        browser.close()


def test_a_reviewer_approves_by_click_and_rejects_by_keyboard(server, browser_page):
    import httpx
    from playwright.sync_api import expect

    keys = create_role_keys("marketing", "other")
    seeded = seed_batch("marketing", [("review", ["blurry"]), ("review", ["near_duplicate"]),
                                      ("review", ["wrong_color"]), ("review", ["underexposed"]), ("pass", [])],
                        name="spring catalogue")
    first, second, third, fourth = seeded.flagged()
    page = browser_page
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))

    page.goto(f"{server}/review")
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", keys["reviewer"])
    page.click("#key-submit")
    expect(page.locator(".card")).to_have_count(4)
    expect(page.locator("#remaining")).to_have_text("4 awaiting review")
    cards = {image_id: page.locator(f'.card[data-image-id="{image_id}"]') for image_id in seeded.flagged()}
    expect(cards[first]).to_have_class("card focused")

    # Thumbnails: the 64-pixel images load and are shown at 320 px with visible pixels.
    thumb = cards[first].locator("img.thumb")
    expect(thumb).to_have_class("thumb small")
    assert thumb.evaluate("img => img.naturalWidth") == 64
    assert thumb.bounding_box()["width"] >= 256

    # By click: approve the first; the focus moves on to the next undecided image.
    cards[first].get_by_role("button", name="Approve").click()
    expect(cards[first]).to_have_attribute("data-status", "approved")
    expect(cards[second]).to_have_class("card focused")
    # By keyboard: j moves to the third, r rejects it with its own QC reason.
    page.keyboard.press("j")
    expect(cards[third]).to_have_class("card focused")
    page.keyboard.press("r")
    expect(cards[third]).to_have_attribute("data-status", "rejected")
    expect(page.locator("#remaining")).to_have_text("2 awaiting review")
    expect(cards[fourth]).to_have_class("card focused")
    page.screenshot(path=str(SCREENSHOT))  # the viewport: the sticky bar over the cards around the focus

    # The key was asked for once: a reload keeps it (sessionStorage) and shows what is left.
    page.reload()
    expect(page.locator(".card")).to_have_count(2)
    expect(page.locator("#key-dialog")).to_be_hidden()
    assert problems == []

    # The API reports both decisions.
    auth = {"Authorization": f"Bearer {keys['reviewer']}"}
    left = httpx.get(f"{server}/v1/review", params={"batch_id": seeded.batch_id}, headers=auth).json()
    assert [entry["image_id"] for entry in left["entries"]] == [second, fourth]
    batch = httpx.get(f"{server}/v1/batches/{seeded.batch_id}", headers=auth).json()
    assert batch["review"]["approved"] == 1 and batch["review"]["rejected"] == 1
    assert batch["review"]["awaiting_review"] == 2
    with session_scope() as session:
        reviews = {r.image_id: r for r in session.scalars(select(Review).where(Review.image_id.in_([first, third])))}
    assert (reviews[first].decision, reviews[first].reason_code) == ("approved", "acceptable")
    assert (reviews[third].decision, reviews[third].reason_code) == ("rejected", "wrong_color")
    assert reviews[first].reviewer_name == reviews[third].reviewer_name == "test reviewer"
