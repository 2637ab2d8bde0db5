"""The paying customer's whole journey, clicked through in Chromium at desktop and phone widths.

Sign up → confirm the address by the link the test SMTP server received → log in → create a
key → call the API → see the call in Usage → buy a pack through the fake Stripe's hosted
page → see the balance and the purchase → cancel a queued job → log out → log in again.
Every page on the way is checked by axe-core (WCAG 2.2 AA) and the whole walk fails on any
console error, CSP violation or failed request. Screenshots of each step land in
``test-artifacts/journey-<width>-<step>.png``.
"""

from __future__ import annotations

import re
from decimal import Decimal
from urllib.parse import urlsplit

import pytest
import requests

from tests.browser_support import DESKTOP, PHONE, axe_violations, chromium, new_page, shot

PASSWORD = "a long enough password"


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_a_customer_walks_from_sign_up_to_a_paid_balance_and_back(
    app, live_server, browser, mailbox, stripe_fake, viewport
):
    app.config["TRIAL_CREDITS"] = Decimal("5")
    width = "phone" if viewport is PHONE else "desktop"
    email = f"journey-{width}@example.com"
    page, watch = new_page(browser, viewport)
    accessibility: dict[str, list[str]] = {}

    def step(name: str) -> None:
        """Check the page as it is now, and keep a picture of it."""
        page.wait_for_load_state("networkidle")
        accessibility[name] = axe_violations(page)
        watch.collect(page)
        shot(page, f"journey-{width}-{name}")

    def dashboard(link: str) -> None:
        page.click(f"nav.dash-nav a:text-is('{link}')")
        page.wait_for_load_state("networkidle")

    # Sign up from the landing page.
    page.goto(live_server + "/")
    step("landing")
    page.click("header >> text=Sign up")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.check("#accept_terms")
    step("sign-up")
    page.click("main button[type=submit]")
    page.wait_for_url("**/login")
    step("check-inbox")

    # Confirm the address by the emailed link, as from the inbox.
    body = mailbox.wait_for(email).get_content()
    link = re.search(r"https?://\S+", body).group(0)
    page.goto(live_server + urlsplit(link).path)
    step("confirm")
    page.click("main button[type=submit]")
    page.wait_for_selector("text=Email confirmed")
    step("confirmed")

    # Log in; the overview leads to the next step.
    page.click("main a:text-is('Log in to your dashboard')")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url("**/dashboard/")
    assert page.locator("[data-testid=step-verify]").get_attribute("data-done") == "true"
    assert page.locator("[data-testid=step-credits]").get_attribute("data-done") == "true"  # the trial credits
    assert page.locator("[data-testid=step-key]").get_attribute("data-done") == "false"
    assert page.locator("[data-testid=balance]").inner_text() == "5.00"
    step("overview-new")

    # Create a key; it is shown once.
    dashboard("API keys")
    page.fill("#key-name", "journey key")
    page.click("text=Create key")
    key = page.locator("[data-testid=new-key]").inner_text().strip()
    assert re.fullmatch(r"brk_live_\w+", key)
    step("key-created")

    # Call the API with it, then see the call in Usage.
    call = requests.post(
        live_server + "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "hello from the journey"}]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert call.status_code == 200, call.text
    request_id = call.headers["X-Request-Id"]
    dashboard("Usage")
    assert page.locator("[data-testid=row-cost]").count() >= 1
    assert request_id in page.content()
    step("usage")

    # Buy a pack through the hosted checkout and come back to the new balance and the purchase.
    dashboard("Billing")
    before = Decimal(page.locator("[data-testid=billing-balance]").inner_text().replace(",", ""))
    page.click("[data-testid=buy-usd5]")
    page.wait_for_url(re.compile(re.escape(stripe_fake.url) + r"/pay/cs_test_\w+"))
    watch.collect(page)
    page.get_by_role("button", name="Pay", exact=True).click()
    page.wait_for_url(live_server + "/dashboard/billing")
    after = Decimal(page.locator("[data-testid=billing-balance]").inner_text().replace(",", ""))
    assert after == before + 500  # $5 at $0.01 a credit
    purchase = page.locator("[data-testid=purchase]").first
    assert purchase.locator("[data-testid=purchase-status]").inner_text() == "paid"
    assert purchase.locator("[data-testid=receipt]").count() == 1
    step("paid")

    # A media job waits in the queue (no worker runs here); cancel it by clicking.
    job = requests.post(
        live_server + "/v1/image",
        json={"model": "demo/image", "prompt": "a lighthouse at dawn"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    ).json()
    dashboard("Jobs")
    row = f"#job-{job['id']}"
    page.click(f"{row} button:has-text('Cancel')")
    page.wait_for_selector(f"{row} [data-testid=job-status]:text-is('canceled')")
    step("job-canceled")

    # Log out, and the dashboard is closed; log in again and everything is still there.
    page.click("header button:text-is('Log out')")
    page.wait_for_load_state("networkidle")
    page.goto(live_server + "/dashboard/billing")
    page.wait_for_url(re.compile(r".*/login\?next=.*"))
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url(live_server + "/dashboard/billing")
    assert Decimal(page.locator("[data-testid=billing-balance]").inner_text().replace(",", "")) == after
    step("back-again")

    assert {name: found for name, found in accessibility.items() if found} == {}
    watch.assert_clean(page)
