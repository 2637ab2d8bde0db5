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
from tests.conftest import Tenant, WorkerProcess, make_tenant

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
    page.wait_for_function("() => document.activeElement && document.activeElement.tagName === 'H2'")
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
    page.wait_for_function("() => document.activeElement && document.activeElement.dataset.testid === 'keys-notice'")
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
    page.wait_for_function(f"() => document.activeElement && document.activeElement.id === 'cap-{tenant.key_id}'")
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


# -- jobs ------------------------------------------------------------------------------------


def submit(base: str, tenant: Tenant, path: str, body: dict) -> dict:
    response = requests.post(base + path, json=body, headers=tenant.headers, timeout=10)
    assert response.status_code == 202, response.text
    return response.json()


def balance(base: str, tenant: Tenant) -> int:
    return requests.get(base + "/v1/balance", headers=tenant.headers, timeout=10).json()["available_ucr"]


def test_jobs_go_live_from_queued_to_succeeded_with_previews_and_named_downloads(live_server, browser, app):
    tenant = customer(app)
    prompt = "a lighthouse at dusk, painted in thick oils, seen from a small boat rocking on a grey sea " * 2
    image = submit(live_server, tenant, "/v1/image", {"model": "demo/image", "prompt": prompt})
    speech = submit(live_server, tenant, "/v1/tts", {"model": "demo/tts", "text": "Hello there", "voice_id": "v1"})
    page, watch = new_page(browser)
    log_in(page, live_server, tenant)
    page.goto(live_server + "/dashboard/jobs")
    image_row, speech_row = f"#job-{image['id']}", f"#job-{speech['id']}"
    assert page.locator(f"{image_row} [data-testid=job-status]").inner_text() == "queued"
    assert page.locator(f"{image_row} button:has-text('Cancel')").count() == 1
    shown = page.locator(f"{image_row} .job-what").inner_text()
    assert shown.startswith("a lighthouse at dusk") and shown.endswith("…") and len(shown) <= 120
    worker = WorkerProcess(app.config["BROKER_TEST_CONFIG"]).start()
    try:
        for row in (image_row, speech_row):
            page.wait_for_selector(f"{row} [data-testid=job-status]:text-is('succeeded')", timeout=20_000)
    finally:
        worker.stop()
    assert page.locator(f"{image_row}[hx-get]").count() == 0  # a finished row polls no more
    assert page.locator(f"{image_row} button:has-text('Cancel')").count() == 0
    page.wait_for_function(
        "row => { const img = document.querySelector(row + ' img'); return img && img.complete && img.naturalWidth }",
        arg=image_row,
    )
    assert page.locator(f"{speech_row} audio[controls]").count() == 1
    link = page.locator(f"{image_row} a[download]")
    assert link.get_attribute("download") == f"{image['id']}_0.png"
    download = page.request.get(live_server + link.get_attribute("href"))
    assert download.headers["content-disposition"] == f'attachment; filename="{image["id"]}_0.png"'
    assert download.headers["content-type"] == "image/png"
    audio_name = page.locator(f"{speech_row} a[download]").get_attribute("download")
    assert audio_name == f"{speech['id']}_0.wav"
    assert page.locator(f"{image_row} td[data-label=Credits]").inner_text().strip() not in ("", "0")
    shot(page, "jobs-finished")
    assert_clean(page, watch)


def test_a_queued_job_is_canceled_by_clicking_and_its_hold_comes_back(live_server, browser, app):
    tenant = customer(app)
    before = balance(live_server, tenant)
    job = submit(live_server, tenant, "/v1/image", {"model": "demo/image", "prompt": "a cancelled idea"})
    assert balance(live_server, tenant) != before  # held
    page, watch = new_page(browser, PHONE)
    log_in(page, live_server, tenant)
    page.goto(live_server + "/dashboard/jobs")
    assert no_sideways_scroll(page)
    row = f"#job-{job['id']}"
    page.click(f"{row} button:has-text('Cancel')")
    page.wait_for_selector(f"{row} [data-testid=job-status]:text-is('canceled')")
    page.wait_for_function("() => document.activeElement && document.activeElement.dataset.testid === 'job-notice'")
    assert "held credits are back" in page.locator(f"{row} [data-testid=job-notice]").inner_text()
    assert page.locator(f"{row}[hx-get]").count() == 0
    assert balance(live_server, tenant) == before
    status = requests.get(f"{live_server}/v1/jobs/{job['id']}", headers=tenant.headers, timeout=10).json()["status"]
    assert status == "canceled"
    shot(page, "jobs-canceled-phone")
    assert_clean(page, watch)
