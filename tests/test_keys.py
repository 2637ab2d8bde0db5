"""API keys: format and checksum, hashed storage, revocation and expiry effective at once, never logged."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from broker import accounts, keys
from broker.models import ApiKey

CHAT = {"model": "demo/chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_generated_keys_have_prefix_and_valid_checksum():
    key = keys.generate()
    assert key.startswith("brk_live_") and keys.well_formed(key)
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    assert not keys.well_formed(flipped)
    assert not keys.well_formed(key[:-7] + key[-6:])


def test_malformed_key_is_refused_without_a_lookup(client, app):
    svc = app.extensions["broker"]
    bogus = "brk_live_" + "a" * 38
    response = client.post("/v1/chat/completions", json=CHAT, headers={"X-API-Key": bogus})
    assert response.status_code == 401
    assert response.json["error"]["type"] == "authentication_error"
    assert svc.redis.keys("apikey:*") == []  # rejected by the checksum: no cache entry, no SQL


def test_both_auth_headers_work(client, tenant):
    assert client.get("/v1/balance", headers={"X-API-Key": tenant.key}).status_code == 200
    assert client.get("/v1/balance", headers={"Authorization": f"Bearer {tenant.key}"}).status_code == 200
    missing = client.get("/v1/balance")
    assert missing.status_code == 401 and missing.json["error"]["code"] == "missing_api_key"


def test_revoked_key_is_refused_at_once_despite_the_cache(client, app, tenant):
    svc = app.extensions["broker"]
    assert client.post("/v1/chat/completions", json=CHAT, headers=tenant.headers).status_code == 200
    assert svc.redis.get(keys.cache_key(keys.hash_key(tenant.key)))  # cached now
    keys.revoke_key(svc.db(), svc.redis, tenant.account_id, tenant.key_id)
    response = client.post("/v1/chat/completions", json=CHAT, headers=tenant.headers)
    assert response.status_code == 401


def test_expired_key_is_refused_even_when_cached(client, app, tenant):
    svc = app.extensions["broker"]
    session = svc.db()
    account = accounts.get_by_email(session, tenant.email)
    _, soon = keys.create_key(session, account, "short", expires_at=datetime.now(UTC) + timedelta(seconds=1))
    _, past = keys.create_key(session, account, "old", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert client.get("/v1/balance", headers={"X-API-Key": soon}).status_code == 200
    assert client.get("/v1/balance", headers={"X-API-Key": past}).json["error"]["code"] == "expired_api_key"
    time.sleep(1.1)
    response = client.get("/v1/balance", headers={"X-API-Key": soon})
    assert response.status_code == 401 and response.json["error"]["code"] == "expired_api_key"


def test_another_accounts_key_cannot_be_revoked(app, tenant):
    import pytest

    from broker.errors import NotFound
    from tests.conftest import make_tenant

    other = make_tenant()
    svc = app.extensions["broker"]
    with pytest.raises(NotFound):
        keys.revoke_key(svc.db(), svc.redis, other.account_id, tenant.key_id)
    assert svc.db().get(ApiKey, tenant.key_id).revoked_at is None


def test_only_hashes_are_stored(app, tenant, tmp_path):
    svc = app.extensions["broker"]
    row = svc.db().scalar(select(ApiKey).where(ApiKey.id == tenant.key_id))
    assert row.key_hash == keys.hash_key(tenant.key)
    assert row.prefix == tenant.key[:15] and len(row.prefix) < len(tenant.key)
    svc.db().close()
    svc.engine.dispose()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("broker.db*"))
    assert tenant.key.encode() not in raw
    assert tenant.key.encode() not in b"".join(svc.redis.dump(k) or b"" for k in svc.redis.keys("*"))


def test_keys_and_provider_secrets_never_reach_the_logs(client, live_server, tenant, upstream, capfd, caplog):
    from tests.conftest import PROVIDER_KEYS
    from tests.fakes.upstreams import Reply

    upstream.queue(Reply(status=401, error_message=f"Incorrect API key provided: {PROVIDER_KEYS['OPENAI_API_KEY']}"))
    unauthorised = client.post(
        "/v1/chat/completions",
        json={**CHAT, "model": "openai/gpt-4o-mini"},
        headers=tenant.headers,
    )
    assert unauthorised.status_code == 502
    assert PROVIDER_KEYS["OPENAI_API_KEY"] not in unauthorised.get_data(as_text=True)
    client.post("/v1/chat/completions", json=CHAT, headers={"X-API-Key": tenant.key[:-1] + "x"})
    import requests

    requests.post(f"{live_server}/v1/chat/completions", json=CHAT, headers=tenant.headers, timeout=10)
    out, err = capfd.readouterr()
    logged = out + err + caplog.text
    assert tenant.key not in logged
    for secret in PROVIDER_KEYS.values():
        assert secret not in logged
