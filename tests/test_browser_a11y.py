"""Every page, public and signed-in, at desktop and phone widths: nothing logged, no WCAG 2.2 AA violation.

axe-core (vendored, pinned) judges accessibility; the watch fails a page on any console
error or warning, CSP violation or failed request. Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import pytest

from broker import accounts
from tests.browser_support import DESKTOP, PHONE, axe_violations, chromium, new_page, shot

PASSWORD = "a long enough password"
PUBLIC = ["/", "/pricing", "/docs", "/terms", "/login", "/signup", "/password/forgot"]
SIGNED_IN = [
    "/dashboard/",
    "/dashboard/keys",
    "/dashboard/usage",
    "/dashboard/jobs",
    "/dashboard/billing",
    "/account/password",
]


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def _log_in(page, base: str, email: str) -> None:
    page.goto(base + "/login")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url("**/dashboard/")


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_every_page_is_clean_and_accessible(app, live_server, browser, viewport):
    accounts.create_account(app.extensions["broker"].db(), "a11y@example.com", PASSWORD)
    page, watch = new_page(browser, viewport)
    width = "phone" if viewport is PHONE else "desktop"
    found: dict[str, list[str]] = {}
    for path in PUBLIC:
        page.goto(live_server + path)
        found[path] = axe_violations(page)
        watch.collect(page)
        shot(page, f"a11y-{width}{path.replace('/', '-') or '-home'}")
    _log_in(page, live_server, "a11y@example.com")
    for path in SIGNED_IN:
        page.goto(live_server + path)
        page.wait_for_load_state("networkidle")
        found[path] = axe_violations(page)
        watch.collect(page)
        shot(page, f"a11y-{width}{path.replace('/', '-')}")
    assert {path: v for path, v in found.items() if v} == {}
    watch.assert_clean(page)
