"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a live server."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.conftest import WorkerProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PASSWORD = "a long enough password"


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(15_000)
        page.on("dialog", lambda dialog: dialog.accept())
        yield page
        browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_public_pages_render_and_are_screenshotted(live_server, browser_page):
    page = browser_page
    for path, name in (("/", "landing"), ("/docs", "docs"), ("/pricing", "pricing"), ("/terms", "terms")):
        response = page.goto(live_server + path)
        assert response.status == 200
        assert page.locator("h1").count() == 1
        shot(page, name)
    page.set_viewport_size({"width": 375, "height": 800})
    page.goto(live_server + "/")
    shot(page, "landing-phone")


def test_sign_up_key_call_usage_revoke(live_server, browser_page, app, mailbox):
    page = browser_page
    page.goto(live_server + "/signup")
    page.fill("#email", "browser@example.com")
    page.fill("#password", PASSWORD)
    page.check("#accept_terms")
    page.click("button[type=submit]")
    page.wait_for_url("**/login")
    # The emailed link, followed as from the inbox, confirms the address (keys need it).
    body = mailbox.wait_for("browser@example.com").get_content()
    link = re.search(r"https?://\S+", body).group(0)
    page.goto(live_server + urlsplit(link).path)
    page.click("text=Confirm my email")
    page.wait_for_selector("text=Email confirmed")
    page.goto(live_server + "/login")
    page.fill("#email", "browser@example.com")
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard/")
    shot(page, "dashboard-overview")

    page.goto(live_server + "/dashboard/keys")
    page.fill("#key-name", "browser key")
    page.click("text=Create key")
    key = page.locator("[data-testid=new-key]").inner_text().strip()
    assert re.fullmatch(r"brk_live_\w+", key)
    shot(page, "dashboard-keys")
    page.reload()
    assert page.locator("[data-testid=new-key]").count() == 0
    assert key not in page.content()

    svc = app.extensions["broker"]
    account_id = (
        svc.db()
        .execute(__import__("sqlalchemy").text("select id from accounts where email = 'browser@example.com'"))
        .scalar()
    )
    svc.ledger.grant(svc.db(), account_id, 5_000_000, "browser-test", "test credits")
    call = requests.post(
        live_server + "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "hi from the browser test"}]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert call.status_code == 200
    cost = call.headers["X-Credits-Charged"]

    page.goto(live_server + "/dashboard/usage")
    assert page.locator("[data-testid=row-cost]").first.inner_text() == cost
    assert page.locator("#spend-chart [data-testid=bar]").count() >= 1
    assert page.locator("#requests-chart [data-testid=bar]").count() >= 1
    shot(page, "dashboard-usage")

    page.goto(live_server + "/dashboard/keys")
    page.click("button:has-text('Revoke')")
    page.wait_for_selector("text=revoked")
    again = requests.get(live_server + "/v1/balance", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert again.status_code == 401


def test_media_job_goes_from_queued_to_succeeded_without_a_reload(live_server, browser_page, app, client):
    from tests.conftest import make_tenant

    tenant = make_tenant("20")
    from werkzeug.security import generate_password_hash

    from broker.models import Account

    session = app.extensions["broker"].db()
    session.get(Account, tenant.account_id).password_hash = generate_password_hash(PASSWORD)
    session.commit()
    job = requests.post(
        live_server + "/v1/image",
        json={"model": "demo/image", "prompt": "a browser test"},
        headers=tenant.headers,
        timeout=10,
    ).json()
    page = browser_page
    page.goto(live_server + "/login")
    page.fill("#email", tenant.email)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard/")
    page.goto(live_server + "/dashboard/jobs")
    status = page.locator(f"#job-{job['id']} [data-testid=job-status]")
    assert status.inner_text() == "queued"
    worker = WorkerProcess(app.config["BROKER_TEST_CONFIG"]).start()
    try:
        page.wait_for_function(
            "id => document.querySelector(`#job-${id} [data-testid=job-status]`).textContent === 'succeeded'",
            arg=job["id"],
            timeout=20_000,
        )
        shot(page, "dashboard-jobs")
        assert page.locator(f"#job-{job['id']} a[download]").count() == 1
    finally:
        worker.stop()
