"""The dashboard's keys, jobs, errors and colours in a real browser (Chromium via Playwright) on a live server.

Every page a test opens is watched (``tests.browser_support``): a console error or warning, a
CSP violation or a failed request fails the test, unless the test allows a status it expects
(a 404 page's own, say).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from werkzeug.security import generate_password_hash

from broker import accounts
from broker.models import Account
from tests.browser_support import PHONE, Watch, axe_violations, chromium, new_page, shot
from tests.conftest import Tenant, make_tenant

PASSWORD = "a long enough password"


@pytest.fixture
def browser():
    with chromium() as browser:
        yield browser


def customer(app, credits: str = "50") -> Tenant:
    """A verified account with a password, a key and credits."""
    tenant = make_tenant(credits)
    session = app.extensions["broker"].db()
    session.get(Account, tenant.account_id).password_hash = generate_password_hash(PASSWORD)
    session.commit()
    return tenant


def log_in(page, base: str, tenant: Tenant, next_path: str = "") -> None:
    page.goto(base + "/login" + (f"?next={next_path}" if next_path else ""))
    page.fill("#email", tenant.email)
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url(f"**{next_path or '/dashboard/'}")


def assert_clean(page, watch: Watch) -> None:
    """``watch.assert_clean``, where Chromium's own console line for an allowed status is no problem either."""
    logged = tuple(
        f"console error: Failed to load resource: the server responded with a status of {s} "
        for s in watch.allowed_statuses
    )
    watch.problems[:] = [problem for problem in watch.problems if not (logged and problem.startswith(logged))]
    watch.assert_clean(page)


def no_sideways_scroll(page) -> bool:
    return page.evaluate("document.scrollingElement.scrollWidth <= document.scrollingElement.clientWidth")


def focused_text(page) -> str:
    return page.evaluate("document.activeElement ? document.activeElement.textContent.trim() : ''")


def api_status(base: str, key: str) -> int:
    return requests.get(base + "/v1/balance", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code


# -- keys ----------------------------------------------------------------------------------


def test_keys_page_fits_a_phone_and_creating_a_key_with_an_expiry_is_quiet(live_server, browser, app):
    page, watch = new_page(browser, PHONE)
    log_in(page, live_server, customer(app))
    page.goto(live_server + "/dashboard/keys")
    assert no_sideways_scroll(page)
    page.fill("#key-name", "phone key")
    page.select_option("#key-expiry", label="In 30 days")
    page.click("text=Create key")
    key = page.locator("[data-testid=new-key]").inner_text().strip()
    assert api_status(live_server, key) == 200
    assert "It expires on" in page.locator(".card.secret").inner_text()
    row = page.locator("tr", has_text="phone key")
    assert row.locator("td[data-label=Expires]").inner_text() != "never"
    page.wait_for_function("document.activeElement && document.activeElement.tagName === 'H2'")
    assert focused_text(page).startswith("Your new key")
    assert no_sideways_scroll(page)
    shot(page, "keys-phone-created")
    assert_clean(page, watch)  # above all: no CSP violation from htmx settling `style` attributes


def test_saving_limits_confirms_and_a_refused_value_shows_the_servers_error(live_server, browser, app):
    tenant = customer(app)
    page, watch = new_page(browser)
    log_in(page, live_server, tenant)
    page.goto(live_server + "/dashboard/keys")
    row = f"#key-{tenant.key_id}"
    page.click(f"{row} summary")
    page.fill(f"#pm-{tenant.key_id}", "5")
    page.click(f"{row} >> text=Save limits")
    notice = page.locator("[data-testid=keys-notice]")
    notice.wait_for()
    assert "Limits saved" in notice.inner_text()
    assert "5/min" in page.locator(f"{row} td[data-label=Limits]").inner_text()
    page.wait_for_function("document.activeElement && document.activeElement.dataset.testid === 'keys-notice'")
    assert_clean(page, watch)

    page.click(f"{row} summary")
    page.fill(f"#pm-{tenant.key_id}", "")
    page.fill(f"#cap-{tenant.key_id}", "0")  # the server wants more than 0
    watch.allowed_statuses.add(422)  # the refusal itself; nothing else may appear
    page.click(f"{row} >> text=Save limits")
    error = page.locator("[data-testid=limit-error]")
    error.wait_for()
    assert "spend cap" in error.inner_text().lower()
    assert page.locator(f"#cap-{tenant.key_id}").get_attribute("aria-invalid") == "true"
    page.wait_for_function(f"document.activeElement && document.activeElement.id === 'cap-{tenant.key_id}'")
    assert page.locator("[data-testid=keys-notice]").count() == 0
    shot(page, "keys-limit-refused")
    assert_clean(page, watch)


def test_revoke_works_without_javascript(live_server, browser, app):
    tenant = customer(app)
    page, watch = new_page(browser, java_script_enabled=False)
    log_in(page, live_server, tenant)
    page.goto(live_server + "/dashboard/keys")
    page.click(f"#key-{tenant.key_id} button:has-text('Revoke')")
    page.wait_for_selector("h1:has-text('Revoke key')")
    assert api_status(live_server, tenant.key) == 200  # asking changes nothing
    page.click("text=Revoke the key")
    page.wait_for_url("**/dashboard/keys")
    assert "is revoked" in page.locator(".flash").inner_text()
    assert page.locator(f"#key-{tenant.key_id} [data-testid=key-status]").inner_text() == "revoked"
    assert api_status(live_server, tenant.key) == 401
    assert_clean(page, watch)


def test_an_expired_session_inside_htmx_goes_to_log_in_and_back(live_server, browser, app):
    tenant = customer(app)
    page, watch = new_page(browser)
    log_in(page, live_server, tenant)
    page.goto(live_server + "/dashboard/keys")
    session = app.extensions["broker"].db()
    accounts.end_sessions(session, session.get(Account, tenant.account_id))  # as a lapsed session would
    app.extensions["broker"].db.remove()
    watch.allowed_statuses.add(401)  # the answer that sends the browser to log in
    page.fill("#key-name", "after expiry")
    page.click("text=Create key")
    page.wait_for_url(lambda url: urlsplit(url).path == "/login")
    assert parse_qs(urlsplit(page.url).query)["next"] == ["/dashboard/keys"]
    assert page.locator("#keys").count() == 0  # the log-in page came whole, not pasted into the keys card
    assert page.locator("h1").count() == 1
    page.fill("#email", tenant.email)
    page.fill("#password", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url("**/dashboard/keys")
    assert_clean(page, watch)


# -- errors and colours ---------------------------------------------------------------------


def test_error_pages_are_in_the_layout_and_the_api_stays_json(live_server, browser, app):
    page, watch = new_page(browser)
    watch.allowed_statuses.add(404)  # the pages' own status
    response = page.goto(live_server + "/no-such-page")
    assert response.status == 404
    assert page.locator("header nav[aria-label=Main] >> text=Pricing").count() == 1
    assert page.locator("h1").inner_text() == "Page not found"
    shot(page, "error-404")
    api = page.goto(live_server + "/v1/nope")
    assert api.status == 404 and api.headers["content-type"].startswith("application/json")
    assert api.json()["error"]["type"] == "invalid_request_error"
    assert_clean(page, watch)


def test_dark_mode_follows_the_system_setting(live_server, browser, app):
    def background(page) -> list[int]:
        page.goto(live_server + "/pricing")
        colour = page.evaluate("getComputedStyle(document.body).backgroundColor")
        return [int(part) for part in re.findall(r"\d+", colour)[:3]]

    dark, dark_watch = new_page(browser, color_scheme="dark")
    light, light_watch = new_page(browser, color_scheme="light")
    assert max(background(dark)) < 60
    assert min(background(light)) > 200
    shot(dark, "pricing-dark")
    # Contrast stays AA in the dark colours: axe-core checks the pricing page and a dashboard page.
    assert axe_violations(dark) == []
    log_in(dark, live_server, customer(app))
    dark.goto(live_server + "/dashboard/keys")
    dark.click("summary")
    assert axe_violations(dark) == []
    shot(dark, "keys-dark")
    assert_clean(dark, dark_watch)
    assert_clean(light, light_watch)
