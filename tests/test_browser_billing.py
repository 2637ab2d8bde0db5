"""Buying credits in a real browser (Chromium via Playwright): Buy, the fake Stripe's hosted page, back.

The site's CSP governs where a form's answer may redirect (``form-action``), so these tests
click as a buyer does, with JavaScript (htmx answers ``HX-Redirect``) and without it (the
form's ``303``), and fail on any console error, CSP violation or failed request
(``tests.browser_support.Watch``), on the site's pages and on the fake hosted page alike.
"""

from __future__ import annotations

import re

import pytest
import requests
from werkzeug.security import generate_password_hash

from broker.models import Account
from tests.browser_support import PHONE, axe_violations, chromium, new_page, shot
from tests.conftest import Tenant, assert_invariant, make_tenant

PASSWORD = "a long enough password"
JS = pytest.mark.parametrize("javascript", [True, False], ids=["javascript", "no-javascript"])


@pytest.fixture
def browser():
    with chromium() as browser:
        yield browser


def buyer(app) -> Tenant:
    """A verified account with a password and no credits."""
    tenant = make_tenant("0")
    session = app.extensions["broker"].db()
    session.get(Account, tenant.account_id).password_hash = generate_password_hash(PASSWORD)
    session.commit()
    return tenant


def open_billing(browser, base: str, tenant: Tenant, javascript: bool):
    """Log in by the form and open the Billing page from the dashboard's navigation."""
    page, watch = new_page(browser, java_script_enabled=javascript)
    checkouts: list = []
    page.on("response", lambda r: checkouts.append(r) if r.url.endswith("/dashboard/billing/checkout") else None)
    page.goto(base + "/login")
    page.fill("#email", tenant.email)
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url(base + "/dashboard/")
    collect(page, watch, javascript)
    page.click("nav a:text-is('Billing')")
    page.wait_for_url(base + "/dashboard/billing")
    return page, watch, checkouts


def collect(page, watch, javascript: bool) -> None:
    """Take this document's CSP violations before leaving it (a script records them only with JavaScript on;
    without it Chromium's own console line for a violation, and a blocked navigation, still show)."""
    if javascript:
        watch.collect(page)


def pay_at_stripe(page, watch, stripe_fake, base: str, javascript: bool) -> str:
    """On the fake hosted page: check what it asks, click Pay, come back; returns the session id."""
    page.wait_for_url(re.compile(re.escape(stripe_fake.url) + r"/pay/cs_test_\w+"))
    session_id = page.url.rpartition("/")[2]
    collect(page, watch, javascript)
    page.get_by_role("button", name="Pay", exact=True).click()
    page.wait_for_url(base + "/dashboard/billing")
    return session_id


def balance_shown(page) -> str:
    return page.locator("[data-testid=billing-balance]").inner_text()


def assert_checkout_path(checkouts: list, javascript: bool) -> None:
    """With JavaScript htmx posts and follows HX-Redirect; without it the form follows the 303."""
    assert checkouts, "the checkout form was never posted"
    answer = checkouts[-1]
    if javascript:
        assert answer.request.headers.get("hx-request") == "true" and answer.status == 204
        assert answer.headers["hx-redirect"].startswith("http")
    else:
        assert "hx-request" not in answer.request.headers and answer.status == 303


@JS
def test_buy_a_pack_and_a_custom_amount_pay_and_see_balance_and_receipts(
    live_server, browser, app, stripe_fake, javascript
):
    tenant = buyer(app)
    page, watch, checkouts = open_billing(browser, live_server, tenant, javascript)
    assert balance_shown(page) == "0.000000"
    assert page.locator("[data-testid=purchase]").count() == 0
    suffix = "js" if javascript else "nojs"
    shot(page, f"billing-empty-{suffix}")

    page.click("[data-testid=buy-usd20]")
    page.wait_for_url(re.compile(re.escape(stripe_fake.url) + r"/pay/"))
    assert_checkout_path(checkouts, javascript)
    assert page.get_by_role("heading", name="Pay $20.00 USD").is_visible()
    shot(page, f"billing-hosted-checkout-{suffix}")
    pack_session = pay_at_stripe(page, watch, stripe_fake, live_server, javascript)
    assert page.get_by_text("Payment received: 2,000 credits added.").is_visible()
    assert balance_shown(page) == "2000.000000"
    row = page.locator("[data-testid=purchase]").first
    assert row.locator("[data-testid=purchase-status]").inner_text() == "paid"
    assert "$20.00" in row.inner_text() and "2,000" in row.inner_text()
    receipt = stripe_fake.charges[pack_session]["receipt_url"]
    assert row.locator("[data-testid=receipt]").get_attribute("href") == receipt

    page.fill("#amount_usd", "12.34")
    collect(page, watch, javascript)
    page.click("[data-testid=buy-custom]")
    page.wait_for_url(re.compile(re.escape(stripe_fake.url) + r"/pay/"))
    assert_checkout_path(checkouts, javascript)
    assert page.get_by_role("heading", name="Pay $12.34 USD").is_visible()
    custom_session = pay_at_stripe(page, watch, stripe_fake, live_server, javascript)
    assert balance_shown(page) == "3234.000000"
    rows = page.locator("[data-testid=purchase]")
    assert rows.count() == 2
    assert "$12.34" in rows.first.inner_text() and "1,234" in rows.first.inner_text()
    assert rows.first.locator("[data-testid=purchase-status]").inner_text() == "paid"
    assert (
        rows.first.locator("[data-testid=receipt]").get_attribute("href")
        == (stripe_fake.charges[custom_session]["receipt_url"])
    )
    shot(page, f"billing-paid-{suffix}")

    # The receipt link leads to the charge's receipt at "Stripe".
    collect(page, watch, javascript)
    rows.last.locator("[data-testid=receipt]").click()
    page.wait_for_url(receipt)
    assert page.get_by_role("heading", name="Receipt").is_visible() and "$20.00 USD" in page.content()
    collect(page, watch, javascript)
    watch.assert_clean(page)
    assert_invariant(app)


@JS
def test_cancel_at_checkout_shows_the_purchase_canceled_and_the_balance_unchanged(
    live_server, browser, app, stripe_fake, javascript
):
    tenant = buyer(app)
    page, watch, checkouts = open_billing(browser, live_server, tenant, javascript)
    page.click("[data-testid=buy-usd5]")
    page.wait_for_url(re.compile(re.escape(stripe_fake.url) + r"/pay/cs_test_\w+"))
    assert_checkout_path(checkouts, javascript)
    session_id = page.url.rpartition("/")[2]
    collect(page, watch, javascript)
    page.get_by_role("button", name="Cancel", exact=True).click()
    page.wait_for_url(live_server + "/dashboard/billing")
    assert page.get_by_text("Checkout canceled; nothing was charged.").is_visible()
    assert balance_shown(page) == "0.000000"
    row = page.locator("[data-testid=purchase]").first
    assert row.locator("[data-testid=purchase-status]").inner_text() == "canceled"
    assert row.locator("[data-testid=receipt]").count() == 0
    assert stripe_fake.session(session_id)["status"] == "expired"
    shot(page, f"billing-canceled-{'js' if javascript else 'nojs'}")
    # The abandoned hosted page can no longer take the money.
    assert requests.post(f"{stripe_fake.url}/pay/{session_id}", data={"action": "pay"}, timeout=5).status_code == 410
    collect(page, watch, javascript)
    watch.assert_clean(page)
    assert_invariant(app)


def test_billing_page_reads_well_on_a_phone_and_passes_axe(live_server, browser, app, stripe_fake):
    tenant = buyer(app)
    page, watch, _ = open_billing(browser, live_server, tenant, True)
    page.click("[data-testid=buy-usd5]")
    pay_at_stripe(page, watch, stripe_fake, live_server, True)
    for viewport, name in ((None, "desktop"), (PHONE, "phone")):
        if viewport:
            page.set_viewport_size(viewport)
        assert axe_violations(page) == [], name
        assert page.evaluate("document.scrollingElement.scrollWidth <= document.scrollingElement.clientWidth"), name
    shot(page, "billing-phone")
    # A refused amount (the browser's own check bypassed, as an old browser would) is said in the card.
    page.fill("#amount_usd", "1")
    page.eval_on_selector("#amount_usd", "el => el.form.noValidate = true")
    watch.allowed_statuses.add(422)  # the refusal's own status, which htmx swaps in
    page.click("[data-testid=buy-custom]")
    error = page.locator("[data-testid=billing-error]")
    error.wait_for()
    assert "amount_usd must be between" in error.inner_text()
    assert page.url == live_server + "/dashboard/billing" and len(stripe_fake.sessions) == 1
    assert axe_violations(page) == []
    # Chromium logs every 4xx answer to a script's request; that line, for the 422 expected here, is no fault.
    expected = "console error: Failed to load resource: the server responded with a status of 422"
    watch.problems[:] = [problem for problem in watch.problems if not problem.startswith(expected)]
    watch.assert_clean(page)
