"""In Debian's chromium (Playwright, no browser download): the batch report renders with the batch's
figures, prints to PDF, and a screenshot lands in var/ (docs/report-page.png with
INSTABATCH_UPDATE_DOCS=1); the review page's queue count follows the
batch's server-sent events when another reviewer decides."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from core import audit
from core import keys as keys_module
from core.audit.anchors import anchor_chain
from core.db import session_scope
from core.settings import REPO_ROOT
from core.storage import get_store
from tests.apikit import create_role_keys
from tests.deliverykit import seed_delivered, served_api
from tests.reviewkit import seed_batch
from tests.test_browser_review import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS

# Each run writes var/; INSTABATCH_UPDATE_DOCS=1 also refreshes the copy committed in docs/.
SCREENSHOT = REPO_ROOT / "var" / "report-page.png"
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "report-page.png"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(CHROMIUM).exists() and not shutil.which("chromium"),
                                                   reason="Debian's chromium is not installed (make browser)")]


@pytest.fixture
def server(configure, sqlite_url):
    configure(DATABASE_URL=sqlite_url)
    with served_api() as url:
        yield url


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def decide(server: str, key: str, image_id: str, decision: str) -> None:
    response = httpx.post(f"{server}/v1/images/{image_id}/review", headers={"Authorization": f"Bearer {key}"},
                          json={"decision": decision, "reason_code": "acceptable" if decision == "approve" else "blurry"})
    assert response.status_code == 200, response.text


def test_the_report_page_shows_the_batch_figures_and_prints(server, browser, tmp_path):
    from playwright.sync_api import expect

    keys = create_role_keys("marketing", "other")
    with session_scope() as session:
        submitter = keys_module.authenticate(session, keys["submitter"]).key_id
    seeded = seed_delivered("marketing", 40, verdicts=("pass", "pass", "pass", "review"), failed_every=13,
                            name="spring catalogue", submitted_by=submitter,
                            params={"width": 512, "height": 512, "num_inference_steps": 1, "guidance_scale": 0.0})
    with session_scope() as session:
        audit.record(session, "item.generated", actor="worker", batch_id=seeded.batch_id,
                     payload={"code_version": "4f2a9c1"})
    auth = {"Authorization": f"Bearer {keys['reviewer']}"}
    flagged = [line for line in httpx.get(f"{server}/v1/batches/{seeded.batch_id}/results", headers=auth,
                                          params={"verdict": "review"}).text.splitlines()]
    for line, decision in zip(flagged, ("approve", "approve", "reject")):
        decide(server, keys["reviewer"], line.split('"image_id":"')[1][:36], decision)
    with session_scope() as session:
        anchor_chain(session, get_store())

    context = browser.new_context(viewport={"width": 1100, "height": 1400},
                                  extra_http_headers={"Authorization": f"Bearer {keys['auditor']}"})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.goto(f"{server}/v1/batches/{seeded.batch_id}/report")
    expect(page.locator("h1")).to_have_text("Generation record: spring catalogue")
    expect(page.locator("#team")).to_have_text("marketing")
    expect(page.locator("#submitter")).to_contain_text("test submitter")
    expect(page.locator("#status")).to_have_text("completed_with_errors")
    expect(page.locator('#counts [data-state="succeeded"] b')).to_have_text("37")
    expect(page.locator('#counts [data-state="failed"] b')).to_have_text("3")
    expect(page.locator('#decisions [data-decision="approved"] b')).to_have_text("2")
    expect(page.locator('#decisions [data-decision="rejected"] b')).to_have_text("1")
    expect(page.locator("#reviewers .reviewer")).to_have_count(1)
    expect(page.locator("#decision-log .decision")).to_have_count(3)
    expect(page.locator("#anchor")).to_contain_text("covers this batch's events")
    expect(page.locator("#verify-command")).to_have_text("instabatch audit verify")
    expect(page.locator("body")).to_contain_text("4f2a9c1")
    expect(page.locator("pre")).to_contain_text('"width": 512')
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    if os.environ.get("INSTABATCH_UPDATE_DOCS") == "1":
        shutil.copyfile(SCREENSHOT, DOCS_SCREENSHOT)
    pdf = tmp_path / "report.pdf"
    page.pdf(path=str(pdf), format="A4")
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 10_000
    assert problems == []
    context.close()


def test_the_review_page_queue_count_follows_the_batch_events(server, browser):
    from playwright.sync_api import expect

    keys = create_role_keys("marketing", "other")
    seeded = seed_batch("marketing", [("review", ["blurry"])] * 3 + [("pass", [])], name="pushed")
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{server}/review")
    page.fill("#key-input", keys["reviewer"])
    page.click("#key-submit")
    page.fill("#filter-batch", seeded.batch_id)
    page.locator("#filter-batch").press("Enter")
    expect(page.locator("#remaining")).to_have_text("3 awaiting review")
    # Another reviewer decides elsewhere: the page did nothing, the event stream brings the count.
    decide(server, keys["reviewer"], seeded.flagged()[0], "approve")
    expect(page.locator("#remaining")).to_have_text("2 awaiting review")
    decide(server, keys["reviewer"], seeded.flagged()[1], "reject")
    expect(page.locator("#remaining")).to_have_text("1 awaiting review")
