"""The keyed API skips the pages' per-request machinery (issue 14): no cookie session, no CSRF,
no IP limits, no Talisman work; its answers still carry the same security headers, HSTS in
production over HTTPS, the request id and the JSON error envelope. Pages keep all of it."""

from __future__ import annotations

import pytest

from tests.test_production_config import STRONG_KEY, production  # noqa: F401  (fixture)

SECURITY_HEADERS = (
    "Permissions-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "Content-Security-Policy",
    "Referrer-Policy",
)


def test_api_answers_carry_the_pages_security_headers_and_no_cookie(client, tenant):
    page = client.get("/pricing")
    for answer in (
        client.get("/v1/balance", headers=tenant.headers),
        client.get("/v1/balance"),  # 401 from the API's own auth hook
    ):
        for name in SECURITY_HEADERS:
            assert answer.headers[name] == page.headers[name], name
        assert answer.headers["X-Request-Id"].startswith("req_")
        assert "Set-Cookie" not in answer.headers
        assert "Cookie" not in answer.headers.get("Vary", "")
    assert client.get("/v1/balance").get_json()["error"]["type"] == "authentication_error"


def test_a_session_cookie_sent_to_the_api_is_neither_read_nor_renewed(client, tenant):
    client.get("/login")  # a page: the session cookie (with its CSRF token) is set
    assert client.get_cookie("session") is not None
    answer = client.get("/v1/balance", headers=tenant.headers)
    assert answer.status_code == 200
    assert "Set-Cookie" not in answer.headers


@pytest.mark.parametrize("proto, hsts", [("https", True), ("http", False)])
def test_api_sends_hsts_in_production_over_https_only(production, proto, hsts):  # noqa: F811
    from tests.conftest import make_tenant

    app = production(TRUSTED_HOSTS="localhost", SECRET_KEY=STRONG_KEY)
    with app.app_context():
        tenant = make_tenant("1")
    client = app.test_client()
    answer = client.get("/v1/balance", headers={**tenant.headers, "X-Forwarded-Proto": proto})
    page = client.get("/pricing", headers={"X-Forwarded-Proto": proto})
    assert answer.status_code == 200
    assert ("Strict-Transport-Security" in answer.headers) is hsts
    assert answer.headers.get("Strict-Transport-Security") == page.headers.get("Strict-Transport-Security")


def test_pages_still_get_talisman_csrf_and_the_session(client):
    page = client.get("/login")
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "Set-Cookie" in page.headers
    refused = client.post("/login", data={"email": "a@example.com", "password": "x"})
    assert refused.status_code == 400  # no CSRF token: the page hook still runs
