"""Operations: health checks, Prometheus metrics behind a token, JSON logs, scrubbed Sentry events, alerts."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from broker import alerts, observability
from tests.fakes.upstreams import Reply


def test_health_and_readiness(client):
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/readyz").json == {"status": "ready"}


def test_metrics_need_the_token_and_count_requests_credits_and_errors(app, client, tenant, upstream):
    assert client.get("/metrics").status_code == 404  # no token configured
    app.config["METRICS_TOKEN"] = "scrape-me"
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 404
    client.post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "hi"}]},
        headers=tenant.headers,
    )
    upstream.queue(Reply(fault="reset"))
    client.post(
        "/v1/chat/completions",
        json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        headers=tenant.headers,
    )
    client.post("/v1/music", json={"model": "demo/music", "prompt": "x"}, headers=tenant.headers)
    text = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"}).get_data(as_text=True)
    assert 'broker_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'broker_upstream_errors_total{code="upstream_unavailable",provider="openai"}' in text
    assert "broker_credits_charged_ucr_total" in text and "broker_request_seconds_bucket" in text
    assert "broker_open_holds 1.0" in text  # the queued music job's hold
    assert 'broker_queue_depth{queue="media"} 1.0' in text
    assert 'broker_jobs{status="queued"} 1.0' in text


def test_logs_are_json_with_request_id_and_never_the_key(client, tenant, capfd):
    client.post("/v1/chat/completions", json={"model": "nope/none", "messages": []}, headers=tenant.headers)
    import logging

    with client.application.test_request_context("/v1/balance"):
        from flask import g

        g.request_id = "req_test"
        logging.getLogger("broker.test").warning("hello", extra={"what": "a log line"})
    err = capfd.readouterr().err
    line = next(json.loads(x) for x in err.splitlines() if '"msg": "hello"' in x)
    assert line["request_id"] == "req_test" and line["what"] == "a log line" and line["level"] == "WARNING"
    assert tenant.key not in err


def test_sentry_events_are_scrubbed():
    event = {
        "request": {
            "headers": {"Authorization": "Bearer brk_live_abc123", "X-API-Key": "brk_live_def", "Accept": "*/*"},
            "cookies": {"session": "s"},
            "data": {"text": "a prompt"},
        },
        "exception": {"values": [{"value": "failed for brk_live_SECRETKEY999"}]},
    }
    scrubbed = observability.scrub(event, {})
    assert scrubbed["request"]["headers"]["Authorization"] == "[scrubbed]"
    assert scrubbed["request"]["headers"]["Accept"] == "*/*"
    assert "cookies" not in scrubbed["request"] and "data" not in scrubbed["request"]
    assert "brk_live_SECRETKEY999" not in json.dumps(scrubbed)


def test_alerts_post_slack_json_once_per_window(app):
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/hook"
    client = app.extensions["broker"].redis
    try:
        assert alerts.send(client, url, "upstream:openai", "openai: 9 of 10 calls failed", 60)
        assert not alerts.send(client, url, "upstream:openai", "openai: 10 of 10 calls failed", 60)
        assert alerts.send(client, url, "jobs:failed", "6 media jobs failed", 60)
    finally:
        server.shutdown()
    assert [r["text"] for r in received] == [
        "[AI API Broker] openai: 9 of 10 calls failed",
        "[AI API Broker] 6 media jobs failed",
    ]


def test_upstream_error_spike_is_found(app, client, tenant, upstream):
    upstream.default = Reply(status=500)
    for _ in range(10):
        client.post(
            "/v1/chat/completions",
            json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5},
            headers=tenant.headers,
        )
    svc = app.extensions["broker"]
    svc.ledger.drain(svc.db(), [tenant.account_id])
    found = alerts.findings(svc.db(), error_rate=0.5, failed_jobs=5)
    assert [kind for kind, _ in found] == ["upstream:openai"]
