"""Logs (one JSON object a line, with the request and account id), request metrics and Sentry with secrets scrubbed."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

from flask import Flask, g, has_request_context, request

from broker import metrics

STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if has_request_context():
            entry["request_id"] = g.get("request_id")
            caller = g.get("caller")
            if caller is not None:
                entry["account_id"] = caller.account_id
        entry.update({k: v for k, v in record.__dict__.items() if k not in STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


SECRET_HEADERS = {
    "authorization",
    "x-api-key",
    "x-rapidapi-proxy-secret",
    "stripe-signature",
    "x-cc-webhook-signature",
    "cookie",
}
KEY_PATTERN = re.compile(r"brk_live_[0-9A-Za-z]+")


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (test runners and daemons swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


# scheme://user:password@host → scheme://[scrubbed]@host (Redis, database and mail URLs carry passwords).
URL_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s/@'\"<>]+@")
SECRET_SETTINGS = re.compile(r"_API_KEY$|SECRET|TOKEN|PASSWORD")
URL_SETTINGS = ("REDIS_URL", "DATABASE_URL", "MAIL_URL", "SENTRY_DSN")
# Headers and query parameters Sentry leaves out (as its send_default_pii=False did), besides its own list.
PII_TERMS = ["forwarded", "-ip", "remote-", "via", "-user"]


def secrets_of(config: dict) -> list[str]:
    """The configured secret values (keys, webhook secrets, tokens, passwords inside URLs), longest first."""
    found = {str(v) for k, v in config.items() if SECRET_SETTINGS.search(k) and isinstance(v, str)}
    for name in URL_SETTINGS:
        try:
            parts = urlsplit(str(config.get(name) or ""))
            found |= {parts.password or "", parts.username or ""}
        except ValueError:
            continue
    # Short values would scrub ordinary words and numbers; real secrets are long.
    return sorted((v for v in found if len(v) >= 8), key=len, reverse=True)


def scrub(event: dict, _hint: dict, secrets: list[str] | tuple[str, ...] = ()) -> dict:
    """Sentry ``before_send``: drop secret headers, cookies and bodies; mask API keys, URL credentials
    and the configured secrets anywhere in the event (frame variables and breadcrumbs included)."""
    request = event.get("request") or {}
    headers = request.get("headers") or {}
    for name in list(headers):
        if name.lower() in SECRET_HEADERS:
            headers[name] = "[scrubbed]"
    request.pop("cookies", None)
    request.pop("data", None)
    text = json.dumps(event, default=str)
    for secret in secrets:
        text = text.replace(json.dumps(secret)[1:-1], "[scrubbed]")
    text = URL_CREDENTIALS.sub(r"\1[scrubbed]@", KEY_PATTERN.sub("brk_live_[scrubbed]", text))
    return json.loads(text)


def init_sentry(dsn: str, environment: str, secrets: list[str] | tuple[str, ...] = ()) -> None:
    import sentry_sdk
    from sentry_sdk.integrations.flask import FlaskIntegration
    from sentry_sdk.integrations.rq import RqIntegration

    def before_send(event: dict, hint: dict) -> dict:
        return scrub(event, hint, secrets)

    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        integrations=[FlaskIntegration(), RqIntegration()],
        # What send_default_pii=False collected, less: no request or response bodies (prompts and
        # answers are customer data), no cookies (sessions), no user, SQL or queue data.
        data_collection={
            "user_info": False,
            "cookies": {"mode": "off"},
            "http_headers": {"request": {"mode": "denylist", "terms": PII_TERMS}},
            "http_bodies": [],
            "url_query_params": {"mode": "denylist", "terms": PII_TERMS},
            "graphql": {"document": False, "variables": False},
            "gen_ai": {"inputs": False, "outputs": False},
            "database_query_data": False,
            "queues": False,
        },
        before_send=before_send,
        traces_sample_rate=0.0,
    )


def _route() -> str:
    return request.url_rule.rule if request.url_rule else "unmatched"


def init_app(app: Flask) -> None:
    if app.config.get("SENTRY_DSN"):
        init_sentry(app.config["SENTRY_DSN"], app.config["BROKER_ENV"], secrets_of(app.config))

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _count(response):
        route = _route()
        metrics.REQUESTS.labels(route, str(response.status_code)).inc()
        metrics.LATENCY.labels(route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    handler = StderrHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("broker")
    root.handlers[:] = [handler]
    root.setLevel(app.config["LOG_LEVEL"])
    root.propagate = False
