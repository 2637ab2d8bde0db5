"""Logs (one JSON object a line, with the request and account id), request metrics and Sentry with secrets scrubbed."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime

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


def scrub(event: dict, _hint: dict) -> dict:
    """Sentry ``before_send``: drop secret headers and cookies, mask API keys anywhere in the event."""
    request = event.get("request") or {}
    headers = request.get("headers") or {}
    for name in list(headers):
        if name.lower() in SECRET_HEADERS:
            headers[name] = "[scrubbed]"
    request.pop("cookies", None)
    request.pop("data", None)
    return json.loads(KEY_PATTERN.sub("brk_live_[scrubbed]", json.dumps(event, default=str)))


def init_sentry(dsn: str, environment: str) -> None:
    import sentry_sdk
    from sentry_sdk.integrations.flask import FlaskIntegration
    from sentry_sdk.integrations.rq import RqIntegration

    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        integrations=[FlaskIntegration(), RqIntegration()],
        send_default_pii=False,
        before_send=scrub,
        traces_sample_rate=0.0,
    )


def _route() -> str:
    return request.url_rule.rule if request.url_rule else "unmatched"


def init_app(app: Flask) -> None:
    if app.config.get("SENTRY_DSN"):
        init_sentry(app.config["SENTRY_DSN"], app.config["BROKER_ENV"])

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
