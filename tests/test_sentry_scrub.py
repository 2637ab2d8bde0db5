"""Secrets never reach Sentry: a real sentry_sdk sends a real event to a local fake Sentry, searched for them."""

from __future__ import annotations

import gzip
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sentry_sdk
from flask import request

from broker import create_app
from tests.conftest import COINBASE_WEBHOOK_SECRET, PROVIDER_KEYS, RAPIDAPI_SECRET, STRIPE_WEBHOOK_SECRET

REDIS_PASSWORD = "redis-pass-Zq8wX2"
MAIL_PASSWORD = "mail-pass-Kp4nT7"
METRICS_TOKEN = "metrics-token-Hj5rL0"
SECRET_KEY = "flask-secret-Vb6mN3-long-enough-for-anything"
STRIPE_SECRET_KEY = "sk_test_stripe-key-Qa1sD9"


class FakeSentry(ThreadingHTTPServer):
    """Accepts envelopes at /api/<project>/envelope/ and keeps their decompressed bytes."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.arrived = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                elif self.headers.get("Content-Encoding") == "br":
                    import brotli

                    body = brotli.decompress(body)
                server.received.append(body)
                server.arrived.set()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def fake_sentry():
    server = FakeSentry()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join(5)


@pytest.fixture
def sentry_app(app, fake_sentry, tenant):
    """The test app's settings with secrets and a DSN for the fake Sentry; sentry_sdk closed afterwards."""
    config = {
        **app.config["BROKER_TEST_CONFIG"],
        "SENTRY_DSN": f"http://public@127.0.0.1:{fake_sentry.server_port}/1",
        "SECRET_KEY": SECRET_KEY,
        "METRICS_TOKEN": METRICS_TOKEN,
        "STRIPE_SECRET_KEY": STRIPE_SECRET_KEY,
        "MAIL_URL": f"smtps://mailer:{MAIL_PASSWORD}@127.0.0.1:465",
        "WTF_CSRF_ENABLED": False,  # the test route takes a POST without a form
    }
    sentry = create_app(config)
    sentry.config["PROPAGATE_EXCEPTIONS"] = False
    key = tenant.key

    @sentry.route("/boom", methods=["GET", "POST"])
    def boom():
        # Frame locals of the kind a real failure holds: a Redis URL with its password, a
        # client's key, provider and webhook secrets.
        request.get_json(silent=True)  # read, as an API route reads its body
        redis_url = f"redis://:{REDIS_PASSWORD}@10.0.0.5:6379/0"
        api_key = key
        settings = {name: sentry.config[name] for name in ("OPENAI_API_KEY", "STRIPE_WEBHOOK_SECRET", "SECRET_KEY")}
        logging.getLogger("test.sentry").warning("connecting to %s with %s", redis_url, api_key)
        raise RuntimeError(f"cannot reach {redis_url} for {api_key}: {settings}")

    yield sentry
    client = sentry_sdk.get_client()
    client.flush(timeout=5)
    client.close()
    services = sentry.extensions["broker"]
    services.db.remove()
    services.engine.dispose()


def test_no_secret_reaches_sentry_from_frame_locals_breadcrumbs_or_messages(sentry_app, fake_sentry, tenant):
    response = sentry_app.test_client().get("/boom", headers={"Authorization": f"Bearer {tenant.key}"})
    assert response.status_code == 500
    sentry_sdk.get_client().flush(timeout=5)
    assert fake_sentry.arrived.wait(5), "no event reached the fake Sentry"
    sent = b"".join(fake_sentry.received)
    assert b"RuntimeError" in sent and b"redis_url" in sent  # the event, with its frame variables, arrived
    assert b"[scrubbed]@10.0.0.5:6379" in sent  # the URL stays useful, without its password
    secrets = [
        REDIS_PASSWORD,
        MAIL_PASSWORD,
        METRICS_TOKEN,
        SECRET_KEY,
        STRIPE_SECRET_KEY,
        STRIPE_WEBHOOK_SECRET,
        COINBASE_WEBHOOK_SECRET,
        RAPIDAPI_SECRET,
        tenant.key,
        tenant.key.removeprefix("brk_live_"),
        *PROVIDER_KEYS.values(),
    ]
    leaked = [secret for secret in secrets if secret.encode() in sent]
    assert leaked == []


def test_a_failing_requests_body_and_cookies_do_not_reach_sentry(sentry_app, fake_sentry, tenant):
    """Prompts are customer data and cookies are sessions: an event carries neither."""
    prompt, cookie = "my private prompt about the merger", "session-cookie-value-4f2a"
    response = sentry_app.test_client().post(
        "/boom",
        json={"messages": [{"role": "user", "content": prompt}]},
        headers={"Authorization": f"Bearer {tenant.key}", "Cookie": f"session={cookie}"},
    )
    assert response.status_code == 500
    sentry_sdk.get_client().flush(timeout=5)
    assert fake_sentry.arrived.wait(5), "no event reached the fake Sentry"
    sent = b"".join(fake_sentry.received)
    assert b"RuntimeError" in sent and b"/boom" in sent  # the event and its request arrived
    assert prompt.encode() not in sent and cookie.encode() not in sent
