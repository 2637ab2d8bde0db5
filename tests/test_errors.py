"""One JSON error envelope, shaped so the official openai SDK raises its matching classes."""

from __future__ import annotations

import openai
import pytest

from broker import create_app
from tests.conftest import app_config, make_tenant
from tests.fakes.upstreams import Reply

MESSAGES = [{"role": "user", "content": "hi"}]


def sdk(live_server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server + "/v1", api_key=key, max_retries=0)


def test_sdk_raises_authentication_error_for_a_bad_key(live_server):
    with pytest.raises(openai.AuthenticationError) as raised:
        sdk(live_server, "brk_live_nope").chat.completions.create(model="demo/chat", messages=MESSAGES)
    assert raised.value.body["type"] == "authentication_error"


def test_sdk_raises_not_found_for_an_unknown_model(live_server, tenant):
    with pytest.raises(openai.NotFoundError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model="openai/gpt-unknown", messages=MESSAGES)
    assert raised.value.body["param"] == "model" and raised.value.body["code"] == "model_not_found"


def test_sdk_raises_bad_request_naming_the_param(live_server, tenant):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model="demo/chat", messages=MESSAGES, temperature=7)
    assert raised.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(
            model="demo/chat", messages=MESSAGES, extra_body={"bogus_field": 1}
        )
    assert raised.value.body["param"] == "bogus_field"


def test_max_tokens_beyond_the_balance_is_402_before_any_upstream_call(app, live_server, upstream):
    poor = make_tenant("0.01")
    with pytest.raises(openai.APIStatusError) as raised:
        sdk(live_server, poor.key).chat.completions.create(
            model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=16000
        )
    assert raised.value.status_code == 402
    assert raised.value.body["code"] == "insufficient_credits"
    assert upstream.requests == []
    assert app.extensions["broker"].ledger.balance(poor.account_id) == 10_000


def test_without_max_tokens_the_upstream_maximum_is_what_the_balance_affords(app, live_server, upstream):
    poor = make_tenant("0.2")  # 200,000 µcr; gpt-4o-mini output costs 108 µcr a token (above MIN_OUTPUT_TOKENS)
    upstream.queue(Reply(input_tokens=5, output_tokens=3))
    sdk(live_server, poor.key).chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    sent = upstream.requests[-1].json["max_completion_tokens"]
    assert 0 < sent < 16384
    held_input = (16 + 2 + 8) * 27  # request + prompt bytes + message overhead, at 27 µcr a token
    assert sent == (200_000 - held_input) // 108


def test_body_over_the_limit_is_413_json(client, tenant):
    response = client.post(
        "/v1/chat/completions",
        data=b'{"model": "demo/chat", "messages": [{"role": "user", "content": "' + b"x" * 1_100_000 + b'"}]}',
        headers={**tenant.headers, "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json["error"]["code"] == "payload_too_large"


def test_not_json_and_unknown_route_get_the_envelope(client, tenant):
    bad = client.post("/v1/chat/completions", data="nope", headers=tenant.headers)
    assert bad.status_code == 400 and bad.json["error"]["code"] == "invalid_json"
    missing = client.get("/v1/nowhere", headers=tenant.headers)
    assert missing.status_code == 404 and set(missing.json["error"]) == {"type", "code", "message", "param"}


def test_upstream_failures_map_to_5xx_classes(live_server, tenant, upstream):
    upstream.queue(Reply(fault="reset"))
    with pytest.raises(openai.InternalServerError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    assert raised.value.status_code == 503


def test_every_response_carries_a_request_id(client, tenant):
    for response in (
        client.get("/v1/balance", headers=tenant.headers),
        client.get("/v1/balance"),
        client.get("/v1/models", headers=tenant.headers),
    ):
        assert response.headers["X-Request-Id"].startswith("req_")


def test_redis_unreachable_is_503_and_nothing_is_charged(tmp_path, upstream, migrated_db, app):
    import shutil

    tenant = make_tenant("5")
    shutil.copy(app.config["DATABASE_URL"].removeprefix("sqlite:///"), tmp_path / "down.db")
    down = create_app(
        {
            **app_config(tmp_path, "redis://127.0.0.1:1/0", upstream, f"sqlite:///{tmp_path / 'down.db'}"),
        }
    )
    response = down.test_client().post(
        "/v1/chat/completions",
        json={"model": "openai/gpt-4o-mini", "messages": MESSAGES},
        headers=tenant.headers,
    )
    assert response.status_code == 503
    assert response.json["error"]["type"] == "service_unavailable"
    assert upstream.requests == []
    assert app.extensions["broker"].ledger.balance(tenant.account_id) == 5_000_000


def test_models_lists_prices_in_credits_with_markup(client, tenant):
    data = {m["id"]: m for m in client.get("/v1/models", headers=tenant.headers).json["data"]}
    mini = data["openai/gpt-4o-mini"]["pricing"]
    # $0.15 / $0.60 per 1M tokens × 1.8 ÷ $0.01 per credit
    assert mini["input"] == "27" and mini["output"] == "108" and mini["cached_input"] == "13.5"
    assert "demo/chat" in data


def test_usage_is_paged_and_filtered_by_model(client, tenant, upstream):
    for model in ("demo/chat", "demo/chat", "openai/gpt-4o-mini"):
        client.post(
            "/v1/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": 5}, headers=tenant.headers
        )
    first = client.get("/v1/usage?limit=2", headers=tenant.headers).json
    assert len(first["data"]) == 2 and first["has_more"]
    rest = client.get(f"/v1/usage?limit=2&cursor={first['next_cursor']}", headers=tenant.headers).json
    assert len(rest["data"]) == 1 and not rest["has_more"]
    only_demo = client.get("/v1/usage?model=demo/chat", headers=tenant.headers).json["data"]
    assert [r["model"] for r in only_demo] == ["demo/chat", "demo/chat"]
    assert client.get("/v1/usage?limit=0", headers=tenant.headers).json["error"]["param"] == "limit"
    assert client.get("/v1/usage?from=yesterday", headers=tenant.headers).json["error"]["param"] == "from"


def test_receipts_are_owner_only(client, tenant):
    response = client.post(
        "/v1/chat/completions", json={"model": "demo/chat", "messages": MESSAGES}, headers=tenant.headers
    )
    request_id = response.headers["X-Request-Id"]
    assert client.get(f"/v1/requests/{request_id}", headers=tenant.headers).status_code == 200
    other = make_tenant()
    assert client.get(f"/v1/requests/{request_id}", headers=other.headers).status_code == 404
