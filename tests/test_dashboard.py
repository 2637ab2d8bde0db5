"""Accounts and the HTMX dashboard: CSRF on every change, partial vs full pages, keys, usage, limits."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import select

from broker import accounts
from broker.models import ApiKey
from tests.conftest import make_tenant

PASSWORD = "correct horse battery"


def csrf_from(html: str) -> str:
    return re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', html).group(1)


def login(client, email: str, password: str = PASSWORD):
    token = csrf_from(client.get("/login").get_data(as_text=True))
    return client.post("/login", data={"email": email, "password": password, "csrf_token": token})


@pytest.fixture
def member(app, client):
    """A logged-in account (with a key and credits), and its CSRF token."""
    tenant = make_tenant("50")
    account = accounts.get_by_email(app.extensions["broker"].db(), tenant.email)
    from werkzeug.security import generate_password_hash

    account.password_hash = generate_password_hash(PASSWORD)
    app.extensions["broker"].db().commit()
    assert login(client, tenant.email).status_code == 302
    token = csrf_from(client.get("/dashboard/keys").get_data(as_text=True))
    return tenant, token


def test_signup_then_login_reaches_the_dashboard(client):
    token = csrf_from(client.get("/signup").get_data(as_text=True))
    signed = client.post(
        "/signup", data={"email": "new@example.com", "password": PASSWORD, "accept_terms": "y", "csrf_token": token}
    )
    assert signed.status_code == 302 and signed.headers["Location"].endswith("/login")
    assert login(client, "new@example.com").headers["Location"].endswith("/dashboard/")
    assert "new@example.com" in client.get("/dashboard/").get_data(as_text=True)


def test_signup_answers_the_same_for_an_existing_email(client, app):
    accounts.create_account(app.extensions["broker"].db(), "taken@example.com", "some other password")
    token = csrf_from(client.get("/signup").get_data(as_text=True))
    answers = []
    for email in ("taken@example.com", "fresh@example.com"):
        start = time.perf_counter()
        response = client.post(
            "/signup", data={"email": email, "password": PASSWORD, "accept_terms": "y", "csrf_token": token}
        )
        answers.append((response.status_code, response.headers["Location"], time.perf_counter() - start))
    assert answers[0][:2] == answers[1][:2]
    assert abs(answers[0][2] - answers[1][2]) < 0.25  # both hash a password
    assert login(client, "taken@example.com").status_code == 400  # the old password still rules


def test_login_fails_the_same_for_unknown_email_and_wrong_password(client, app):
    accounts.create_account(app.extensions["broker"].db(), "known@example.com", PASSWORD)
    unknown = login(client, "nobody@example.com")
    wrong = login(client, "known@example.com", "wrong password!")
    assert unknown.status_code == wrong.status_code == 400
    assert "Wrong email or password." in unknown.get_data(as_text=True)
    assert "Wrong email or password." in wrong.get_data(as_text=True)


def test_dashboard_requires_login(client):
    response = client.get("/dashboard/keys")
    assert response.status_code == 302 and "/login" in response.headers["Location"]


def test_state_changes_without_a_csrf_token_are_400(client, member):
    tenant, token = member
    assert client.post("/dashboard/keys", data={"name": "x"}).status_code == 400
    assert client.delete(f"/dashboard/keys/{tenant.key_id}").status_code == 400
    assert client.post("/logout").status_code == 400
    token_form = client.post("/account/password", data={"current": PASSWORD, "new": "x" * 12, "confirm": "x" * 12})
    assert token_form.status_code == 400
    created = client.post("/dashboard/keys", data={"name": "ok"}, headers={"HX-Request": "true", "X-CSRFToken": token})
    assert created.status_code == 200 and "brk_live_" in created.get_data(as_text=True)


def test_created_key_is_shown_once_and_revocation_works_at_once(client, member):
    tenant, token = member
    hx = {"HX-Request": "true", "X-CSRFToken": token}
    created = client.post("/dashboard/keys", data={"name": "laptop"}, headers=hx).get_data(as_text=True)
    key = re.search(r"brk_live_\w+", created).group(0)
    assert client.get("/v1/balance", headers={"X-API-Key": key}).status_code == 200
    listing = client.get("/dashboard/keys").get_data(as_text=True)
    assert key not in listing and key[:15] in listing
    key_id = int(re.search(r'id="key-(\d+)"', listing).group(1))
    assert client.delete(f"/dashboard/keys/{key_id}", headers=hx).status_code == 200
    assert client.get("/v1/balance", headers={"X-API-Key": key}).status_code == 401


def test_another_accounts_key_cannot_be_revoked(client, member, app):
    _, token = member
    other = make_tenant()
    response = client.delete(f"/dashboard/keys/{other.key_id}", headers={"HX-Request": "true", "X-CSRFToken": token})
    assert response.status_code == 404
    assert client.get("/v1/balance", headers=other.headers).status_code == 200


@pytest.mark.parametrize(
    "path", ["/dashboard/", "/dashboard/keys", "/dashboard/usage", "/dashboard/jobs", "/dashboard/billing"]
)
def test_partials_only_for_htmx_requests_that_are_not_history_restores(client, member, path):
    full = client.get(path)
    partial = client.get(path, headers={"HX-Request": "true"})
    restore = client.get(path, headers={"HX-Request": "true", "HX-History-Restore-Request": "true"})
    assert full.status_code == partial.status_code == restore.status_code == 200
    assert "<html" in full.get_data(as_text=True) and "<html" in restore.get_data(as_text=True)
    assert "<html" not in partial.get_data(as_text=True)
    assert "HX-Request" in full.headers["Vary"] and "HX-Request" in partial.headers["Vary"]


def test_usage_page_shows_a_call_with_its_cost_and_exports_csv(client, member):
    tenant, _ = member
    call = client.post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 20},
        headers=tenant.headers,
    )
    charged = call.headers["X-Credits-Charged"]
    page = client.get("/dashboard/usage").get_data(as_text=True)
    assert "demo/chat" in page and charged in page
    assert 'data-testid="bar"' in page  # the chart has a bar for today
    csv_text = client.get("/dashboard/usage.csv?model=demo/chat").get_data(as_text=True)
    assert csv_text.splitlines()[0].startswith("time,request_id,model")
    assert charged in csv_text and call.headers["X-Request-Id"] in csv_text
    assert len(client.get("/dashboard/usage.csv?model=openai/gpt-4o").get_data(as_text=True).splitlines()) == 1


def test_changing_the_password_ends_other_sessions(app, member, client):
    tenant, token = member
    other = app.test_client()
    second = login(other, tenant.email)
    assert second.status_code == 302, second.get_data(as_text=True)[-3000:]
    changed = client.post(
        "/account/password",
        data={"current": PASSWORD, "new": "a brand new secret", "confirm": "a brand new secret", "csrf_token": token},
    )
    assert changed.status_code == 302
    assert client.get("/dashboard/keys").status_code == 200
    assert other.get("/dashboard/keys").status_code == 302


def test_security_headers(client):
    response = client.get("/login")
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert response.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert response.headers["X-Frame-Options"] == "DENY"


def test_a_key_can_be_tightened_from_the_dashboard(app, client, member):
    tenant, token = member
    hx = {"HX-Request": "true", "X-CSRFToken": token}
    saved = client.post(f"/dashboard/keys/{tenant.key_id}/limits", data={"per_minute": "2"}, headers=hx)
    assert saved.status_code == 200 and "2/min" in saved.get_data(as_text=True)
    statuses = [client.get("/v1/balance", headers=tenant.headers).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    too_high = client.post(f"/dashboard/keys/{tenant.key_id}/limits", data={"per_minute": "999999"}, headers=hx)
    # Refused: 422 with the form and the server's reason in place (htmx swaps a 422 in; see base.html).
    assert too_high.status_code == 422
    assert "Requests a minute must be a whole number from 1 to" in too_high.get_data(as_text=True)
    assert 'aria-invalid="true"' in too_high.get_data(as_text=True)
    other = make_tenant()
    assert (
        client.post(f"/dashboard/keys/{other.key_id}/limits", data={"per_minute": "1"}, headers=hx).status_code == 404
    )
    assert (
        client.post(f"/dashboard/keys/{tenant.key_id}/limits", data={"per_minute": "5"}).status_code == 400
    )  # no CSRF


# -- keys: expiry, notices, revoke without JavaScript ---------------------------------------


def test_a_key_can_be_made_with_an_expiry_and_a_bad_choice_is_refused(app, client, member):
    _, token = member
    hx = {"HX-Request": "true", "X-CSRFToken": token}
    created = client.post("/dashboard/keys", data={"name": "month", "expires_in_days": "30"}, headers=hx)
    assert created.status_code == 200 and "It expires on" in created.get_data(as_text=True)
    key = re.search(r"brk_live_\w+", created.get_data(as_text=True)).group(0)
    assert client.get("/v1/balance", headers={"X-API-Key": key}).status_code == 200
    session = app.extensions["broker"].db()
    row = session.scalar(select(ApiKey).where(ApiKey.name == "month"))
    expires = row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC)
    assert timedelta(days=29, hours=23) < expires - datetime.now(UTC) <= timedelta(days=30)
    refused = client.post("/dashboard/keys", data={"name": "odd", "expires_in_days": "3650"}, headers=hx)
    assert refused.status_code == 422 and "Choose when the key expires" in refused.get_data(as_text=True)
    assert session.scalar(select(ApiKey).where(ApiKey.name == "odd")) is None


def test_saved_limits_are_confirmed(client, member):
    tenant, token = member
    hx = {"HX-Request": "true", "X-CSRFToken": token}
    saved = client.post(f"/dashboard/keys/{tenant.key_id}/limits", data={"credits_per_day": "2.5"}, headers=hx)
    assert saved.status_code == 200 and 'data-testid="keys-notice"' in saved.get_data(as_text=True)
    assert "Limits saved" in saved.get_data(as_text=True)


def test_revoke_without_javascript_asks_then_revokes_and_needs_csrf(client, member):
    tenant, token = member
    path = f"/dashboard/keys/{tenant.key_id}/revoke"
    assert client.post(path, data={"confirm": "yes"}).status_code == 400  # no CSRF token
    asked = client.post(path, data={"csrf_token": token})
    assert asked.status_code == 200 and "Revoke the key" in asked.get_data(as_text=True)
    assert client.get("/v1/balance", headers=tenant.headers).status_code == 200
    done = client.post(path, data={"csrf_token": token, "confirm": "yes"})
    assert done.status_code == 303 and done.headers["Location"].endswith("/dashboard/keys")
    assert client.get("/v1/balance", headers=tenant.headers).status_code == 401
    assert "is revoked" in client.get("/dashboard/keys").get_data(as_text=True)
    other = make_tenant()
    assert client.post(f"/dashboard/keys/{other.key_id}/revoke", data={"csrf_token": token}).status_code == 404


# -- without a session: HTMX goes to log-in whole ---------------------------------------------


def test_htmx_without_a_session_is_sent_to_log_in_with_the_page_as_next(app, client, member):
    tenant, token = member
    page = {"HX-Request": "true", "HX-Current-URL": "http://localhost/dashboard/usage?days=7"}
    assert client.get("/dashboard/balance", headers=page).status_code == 200
    accounts.end_sessions(
        app.extensions["broker"].db(), accounts.get_by_email(app.extensions["broker"].db(), tenant.email)
    )
    poll = client.get("/dashboard/balance", headers=page)
    assert poll.status_code == 401 and poll.get_data() == b""
    target = urlsplit(poll.headers["HX-Redirect"])
    assert target.path == "/login" and parse_qs(target.query)["next"] == ["/dashboard/usage?days=7"]
    elsewhere = client.get(
        "/dashboard/balance", headers={"HX-Request": "true", "HX-Current-URL": "https://evil.test/x"}
    )
    assert parse_qs(urlsplit(elsewhere.headers["HX-Redirect"]).query)["next"] == ["/dashboard/"]
    whole = client.get("/dashboard/keys")
    assert whole.status_code == 302 and parse_qs(urlsplit(whole.headers["Location"]).query)["next"] == [
        "/dashboard/keys"
    ]


def test_htmx_post_from_a_tab_left_open_after_logging_out_goes_to_log_in(client, member):
    _, token = member
    client.post("/logout", data={"csrf_token": token})
    response = client.post("/dashboard/keys", data={"name": "x"}, headers={"HX-Request": "true", "X-CSRFToken": token})
    assert response.status_code == 401 and urlsplit(response.headers["HX-Redirect"]).path == "/login"
    assert (
        client.post("/dashboard/keys", data={"name": "x", "csrf_token": token}).status_code == 400
    )  # no JS: as before


# -- error pages ------------------------------------------------------------------------------


def test_error_pages_for_people_and_json_for_the_api(app, client):
    missing = client.get("/no-such-page")
    html = missing.get_data(as_text=True)
    assert missing.status_code == 404 and missing.mimetype == "text/html"
    assert '<nav aria-label="Main">' in html and "Page not found" in html
    api = client.get("/v1/nope")
    assert api.status_code == 404 and api.get_json()["error"]["code"] == "not_found"
    wrong_method = client.delete("/pricing")
    assert wrong_method.status_code == 405 and "GET" in wrong_method.headers["Allow"]
    assert "Method not allowed" in wrong_method.get_data(as_text=True)
    assert client.delete("/v1/balance").get_json()["error"]["type"] == "invalid_request_error"


def test_an_unexpected_error_is_a_page_in_the_layout(app):
    app.config["PROPAGATE_EXCEPTIONS"] = False  # as in production: the handler answers, not the test client

    def boom():
        raise RuntimeError("a bug")

    app.add_url_rule("/boom-for-test", "boom_for_test", boom)
    response = app.test_client().get("/boom-for-test")
    assert response.status_code == 500 and "Something went wrong" in response.get_data(as_text=True)
    assert '<nav aria-label="Main">' in response.get_data(as_text=True) and "a bug" not in response.get_data(
        as_text=True
    )


def test_too_many_requests_is_a_page_with_retry_after(client):
    token = csrf_from(client.get("/password/forgot").get_data(as_text=True))
    form = {"email": "someone@example.com", "csrf_token": token}
    assert [client.post("/password/forgot", data=form).status_code for _ in range(3)] == [302, 302, 302]
    limited = client.post("/password/forgot", data=form)  # 3 an hour for one address
    assert limited.status_code == 429 and "Too many requests" in limited.get_data(as_text=True)
    assert '<nav aria-label="Main">' in limited.get_data(as_text=True)
    assert int(limited.headers["Retry-After"]) > 0


# -- jobs: cancel and named files ----------------------------------------------------------------


def test_a_queued_job_is_canceled_from_the_dashboard_and_only_once(app, client, member):
    tenant, token = member
    job = client.post("/v1/image", json={"model": "demo/image", "prompt": "never made"}, headers=tenant.headers)
    job_id = job.get_json()["id"]
    hx = {"HX-Request": "true", "X-CSRFToken": token}
    canceled = client.post(f"/dashboard/jobs/{job_id}/cancel", headers=hx)
    assert canceled.status_code == 200 and "held credits are back" in canceled.get_data(as_text=True)
    assert client.get(f"/v1/jobs/{job_id}", headers=tenant.headers).get_json()["status"] == "canceled"
    again = client.post(f"/dashboard/jobs/{job_id}/cancel", data={"csrf_token": token})
    assert again.status_code == 303
    assert "Not canceled: the job is already canceled" in client.get("/dashboard/jobs").get_data(as_text=True)
    assert client.post(f"/dashboard/jobs/{job_id}/cancel", headers={"HX-Request": "true"}).status_code == 400
    other = make_tenant()
    theirs = client.post("/v1/image", json={"model": "demo/image", "prompt": "theirs"}, headers=other.headers)
    assert client.post(f"/dashboard/jobs/{theirs.get_json()['id']}/cancel", headers=hx).status_code == 404
    assert client.get(f"/v1/jobs/{theirs.get_json()['id']}", headers=other.headers).get_json()["status"] == "queued"


def test_download_names_say_what_the_file_is():
    from broker.web.dashboard.jobs import file_name

    assert file_name("job_ab12", 0, "image/png") == "job_ab12_0.png"
    assert file_name("job_ab12", 1, "audio/mpeg") == "job_ab12_1.mp3"
    assert file_name("job_ab12", 0, "audio/wav; rate=44100") == "job_ab12_0.wav"
    assert file_name("job_ab12", 0, "audio/pcmu") == "job_ab12_0.ulaw"
    assert file_name("job_ab12", 0, "application/x-unknown-thing") == "job_ab12_0.bin"
