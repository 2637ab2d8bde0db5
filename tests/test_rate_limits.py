"""Per-key limits: requests a minute and a day, a daily spend cap; 429 with Retry-After and X-RateLimit-*."""

from __future__ import annotations

from decimal import Decimal

from broker.limits import Limits

CHAT = {"model": "demo/chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_requests_per_minute_are_limited_with_headers(app, client, tenant):
    app.config["DEFAULT_LIMITS"] = Limits(3, 1000, 0)
    answers = [client.get("/v1/balance", headers=tenant.headers) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["X-RateLimit-Limit"] == "3" and answers[0].headers["X-RateLimit-Remaining"] == "2"
    limited = answers[3]
    assert limited.json["error"]["type"] == "rate_limit_error"
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["X-RateLimit-Remaining"] == "0" and int(limited.headers["X-RateLimit-Reset"]) <= 60


def test_limits_are_per_key_and_overridable_per_key(app, client, runner, tenant):
    from tests.conftest import make_tenant

    app.config["DEFAULT_LIMITS"] = Limits(2, 1000, 0)
    other = make_tenant()
    for _ in range(2):
        client.get("/v1/balance", headers=tenant.headers)
    assert client.get("/v1/balance", headers=tenant.headers).status_code == 429
    assert client.get("/v1/balance", headers=other.headers).status_code == 200
    result = runner.invoke(args=["broker", "limit-key", str(tenant.key_id), "--per-minute", "100"])
    assert result.exit_code == 0, result.output
    response = client.get("/v1/balance", headers=tenant.headers)
    assert response.status_code == 200 and response.headers["X-RateLimit-Limit"] == "100"


def test_requests_per_day(app, client, tenant):
    app.config["DEFAULT_LIMITS"] = Limits(100, 2, 0)
    statuses = [client.get("/v1/balance", headers=tenant.headers).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_daily_spend_cap_stops_further_calls_without_overshooting(app, client, tenant):
    # Each call holds its worst case against the cap until it settles: calls stop before the
    # day's charges could pass the cap, not after.
    cap = Decimal("0.05")
    app.config["DEFAULT_LIMITS"] = Limits(100, 1000, int(cap * 1_000_000))
    spent, calls = Decimal(0), 0
    while calls < 200:
        response = client.post("/v1/chat/completions", json=CHAT, headers=tenant.headers)
        if response.status_code == 429:
            assert response.json["error"]["code"] == "spend_cap_reached"
            assert int(response.headers["Retry-After"]) <= 86400
            break
        assert response.status_code == 200
        spent += Decimal(response.headers["X-Credits-Charged"])
        calls += 1
    assert 1 < calls < 200 and spent <= cap
