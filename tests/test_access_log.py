"""Real gunicorn with gunicorn.conf.py: no API key in the access log, however the client sends it; URL limits."""

from __future__ import annotations

import base64
import time

import pytest
import requests

from tests.conftest import GunicornProcess


@pytest.fixture
def gunicorn(app, tmp_path):
    """gunicorn -c gunicorn.conf.py app:app, one worker, the access log in a file; yields (base URL, log path)."""
    access_log = tmp_path / "access.log"
    with GunicornProcess(app, tmp_path, GUNICORN_ACCESSLOG=str(access_log), GUNICORN_LOGLEVEL="warning") as server:
        yield server.base, access_log


def test_no_api_key_in_the_access_log_however_it_is_sent(gunicorn, tenant):
    base, access_log = gunicorn
    key = tenant.key
    basic_user = base64.b64encode(f"{key}:".encode()).decode()
    basic_password = base64.b64encode(f"me:{key}".encode()).decode()
    sent = [
        requests.get(f"{base}/v1/balance", headers={"Authorization": f"Basic {basic_user}"}, timeout=10),
        requests.get(f"{base}/v1/balance", headers={"Authorization": f"Basic {basic_password}"}, timeout=10),
        requests.get(f"{base}/v1/balance?api_key={key}", timeout=10),
        requests.get(f"{base}/v1/balance", headers={"X-API-Key": key}, timeout=10),
        requests.get(f"{base}/v1/balance", headers={"Authorization": f"Bearer {key}"}, timeout=10),
        requests.get(
            f"{base}/docs", headers={"Referer": f"https://example.com/?k={key}", "User-Agent": key}, timeout=10
        ),
    ]
    assert [r.status_code for r in sent][3:5] == [200, 200]
    deadline = time.monotonic() + 10
    while len(access_log.read_text().splitlines()) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.1)
    text = access_log.read_text()
    assert len(text.splitlines()) >= len(sent), text
    assert "/v1/balance?api_key=brk_live_[masked]" in text
    assert key not in text and key.removeprefix("brk_live_") not in text


def test_url_limits_under_gunicorn(gunicorn, tenant):
    base, _ = gunicorn
    app_refused = requests.get(f"{base}/v1/balance?q={'a' * 6000}", headers=tenant.headers, timeout=10)
    assert app_refused.status_code == 414 and app_refused.json()["error"]["code"] == "request_uri_too_long"
    # gunicorn's own limit_request_line (8190, its maximum) answers before the app, in plain text.
    server_refused = requests.get(f"{base}/v1/balance?q={'a' * 8200}", headers=tenant.headers, timeout=10)
    assert server_refused.status_code == 414
    long_header = requests.get(f"{base}/v1/balance", headers={**tenant.headers, "X-Long": "a" * 8200}, timeout=10)
    assert long_header.status_code == 431
