"""Abuse filters: a blocklist and OpenAI moderation refuse a request before anything is held or called."""

from __future__ import annotations

import pytest

from broker import create_app
from tests.conftest import CURRENT, assert_invariant, make_tenant


@pytest.fixture
def strict_app(tmp_path, redis_server, upstream, stripe_fake, migrated_db, app):
    """The test app's database and Redis, with a blocklist and OpenAI moderation switched on."""
    config = {
        **app.config["BROKER_TEST_CONFIG"],
        "BLOCKLIST": "forbidden phrase,contraband",
        "MODERATION": "openai",
    }
    strict = create_app(config)
    CURRENT["app"] = strict
    return strict


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {"model": "demo/chat", "messages": [{"role": "user", "content": "a Forbidden Phrase"}]},
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"model": "demo/chat", "messages": [{"role": "user", "content": "FLAG_ME please"}]},
            "messages",
        ),
        ("/v1/image", {"model": "demo/image", "prompt": "contraband"}, "prompt"),
        ("/v1/music", {"model": "demo/music", "prompt": "a song FLAG_ME"}, "prompt"),
    ],
)
def test_flagged_requests_are_400_and_not_charged(strict_app, upstream, path, body, param):
    tenant = make_tenant("5")
    client = strict_app.test_client()
    response = client.post(path, json=body, headers=tenant.headers)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "content_policy_violation" and response.json["error"]["param"] == param
    assert strict_app.extensions["broker"].ledger.balance(tenant.account_id) == 5_000_000
    assert client.get("/v1/jobs", headers=tenant.headers).json["data"] == []
    assert_invariant(strict_app)


def test_clean_requests_pass_the_moderation_check(strict_app, upstream):
    tenant = make_tenant("5")
    response = strict_app.test_client().post(
        "/v1/chat/completions",
        json={"model": "demo/chat", "messages": [{"role": "user", "content": "hello"}]},
        headers=tenant.headers,
    )
    assert response.status_code == 200
    assert [r.provider for r in upstream.requests] == ["openai_moderation"]


def test_body_bounds_are_enforced(client, tenant):
    too_many = {"model": "demo/chat", "messages": [{"role": "user", "content": "x"}] * 2049}
    assert (
        client.post("/v1/chat/completions", json=too_many, headers=tenant.headers).json["error"]["param"] == "messages"
    )
    n = {"model": "demo/chat", "messages": [{"role": "user", "content": "x"}], "n": 9}
    assert client.post("/v1/chat/completions", json=n, headers=tenant.headers).json["error"]["param"] == "n"
    long_text = {"model": "demo/tts", "text": "x" * 40_001, "voice_id": "v"}
    assert client.post("/v1/tts", json=long_text, headers=tenant.headers).json["error"]["param"] == "text"
