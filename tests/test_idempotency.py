"""Idempotency-Key: a retried POST replays the first answer and is charged once."""

from __future__ import annotations

import threading

import pytest

from broker import idempotency
from broker.errors import Conflict
from tests.conftest import assert_invariant
from tests.fakes.upstreams import Reply

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "once"}], "max_tokens": 10}


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


def test_same_key_same_body_replays_and_charges_once(app, client, tenant, upstream):
    headers = {**tenant.headers, "Idempotency-Key": "order-42"}
    start = balance(app, tenant)
    first = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    second = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert second.json == first.json
    assert second.headers["X-Credits-Charged"] == first.headers["X-Credits-Charged"]
    assert len(upstream.requests) == 1
    assert start - balance(app, tenant) == int(first.json["usage"]["cost_credits"] * 1_000_000)
    assert_invariant(app)


def test_same_key_different_body_is_409(client, tenant):
    headers = {**tenant.headers, "Idempotency-Key": "k1"}
    client.post("/v1/chat/completions", json=CHAT, headers=headers)
    other = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 11}, headers=headers)
    assert other.status_code == 409 and other.json["error"]["code"] == "idempotency_key_reused"


def test_keys_are_per_account(client, tenant, upstream):
    from tests.conftest import make_tenant

    other = make_tenant()
    client.post("/v1/chat/completions", json=CHAT, headers={**tenant.headers, "Idempotency-Key": "shared"})
    theirs = client.post("/v1/chat/completions", json=CHAT, headers={**other.headers, "Idempotency-Key": "shared"})
    assert "Idempotent-Replayed" not in theirs.headers and len(upstream.requests) == 2


def test_concurrent_duplicates_execute_once(app, live_server, tenant, upstream):
    import requests

    upstream.default = Reply(delay=0.5)
    start = balance(app, tenant)
    barrier = threading.Barrier(5)
    answers = []

    def call() -> None:
        barrier.wait()
        response = requests.post(
            f"{live_server}/v1/chat/completions",
            json=CHAT,
            headers={**tenant.headers, "Idempotency-Key": "burst"},
            timeout=10,
        )
        answers.append(response.status_code)

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == [200] + [409] * 4
    assert len(upstream.requests) == 1
    replay = requests.post(
        f"{live_server}/v1/chat/completions",
        json=CHAT,
        headers={**tenant.headers, "Idempotency-Key": "burst"},
        timeout=10,
    )
    assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
    assert start - balance(app, tenant) > 0
    assert_invariant(app)


def test_server_errors_are_not_kept_so_a_retry_runs(app, client, tenant, upstream):
    upstream.queue(Reply(status=500), Reply(status=500), Reply(status=500))
    headers = {**tenant.headers, "Idempotency-Key": "retry-me"}
    failed = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert failed.status_code == 502
    retried = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert retried.status_code == 200 and "Idempotent-Replayed" not in retried.headers


def test_media_submit_replays_the_same_job(app, client, tenant):
    headers = {**tenant.headers, "Idempotency-Key": "song-1"}
    body = {"model": "demo/music", "prompt": "a tune"}
    first = client.post("/v1/music", json=body, headers=headers)
    second = client.post("/v1/music", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json["id"] == second.json["id"] and second.headers["Location"] == first.headers["Location"]
    jobs = client.get("/v1/jobs", headers=tenant.headers).json["data"]
    assert len(jobs) == 1


def test_a_response_over_the_size_cap_is_not_kept_so_a_retry_runs_again(app, client, tenant, upstream):
    app.config["IDEMPOTENCY_MAX_BODY_BYTES"] = 200  # a chat completion is larger
    headers = {**tenant.headers, "Idempotency-Key": "big-answer"}
    first = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert first.status_code == 200 and len(first.get_data()) > 200
    again = client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    assert len(upstream.requests) == 2
    assert not app.extensions["broker"].redis.keys(f"idem:{tenant.account_id}:[0-9a-f]*")


def test_an_account_cannot_hold_more_than_the_cap_of_idempotency_keys(app, client, tenant):
    """Cheap refused requests (a 400 is kept too) cannot pile up stored replies without end."""
    from tests.conftest import make_tenant

    app.config["IDEMPOTENCY_KEYS_PER_ACCOUNT"] = 3
    r = app.extensions["broker"].redis
    answers = [
        client.post("/v1/chat/completions", json={}, headers={**tenant.headers, "Idempotency-Key": f"junk-{n}"})
        for n in range(6)
    ]
    assert [a.status_code for a in answers] == [400, 400, 400, 429, 429, 429]
    refused = answers[3]
    assert refused.json["error"]["code"] == "too_many_idempotency_keys"
    assert 0 < int(refused.headers["Retry-After"]) <= 24 * 3600
    assert len(r.keys(f"idem:{tenant.account_id}:[0-9a-f]*")) == 3
    replay = client.post("/v1/chat/completions", json={}, headers={**tenant.headers, "Idempotency-Key": "junk-0"})
    assert replay.status_code == 400 and replay.headers["Idempotent-Replayed"] == "true"
    assert client.post("/v1/chat/completions", json=CHAT, headers=tenant.headers).status_code == 200  # none: fine
    other = make_tenant()
    theirs = client.post("/v1/chat/completions", json=CHAT, headers={**other.headers, "Idempotency-Key": "junk-0"})
    assert theirs.status_code == 200


def test_a_key_that_was_not_kept_frees_its_place(app, client, tenant, upstream):
    app.config["IDEMPOTENCY_KEYS_PER_ACCOUNT"] = 1
    upstream.queue(Reply(status=500), Reply(status=500), Reply(status=500))
    failed = client.post("/v1/chat/completions", json=CHAT, headers={**tenant.headers, "Idempotency-Key": "a"})
    assert failed.status_code == 502
    kept = client.post("/v1/chat/completions", json=CHAT, headers={**tenant.headers, "Idempotency-Key": "b"})
    assert kept.status_code == 200


def test_a_streamed_call_is_charged_once_and_replayed_after_it_ends(app, live_server, tenant, upstream):
    """Issue 10 item 12: the same streamed POST twice was charged twice."""
    import requests

    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {**tenant.headers, "Idempotency-Key": "stream-once"}
    upstream.default = Reply(text="a streamed answer", chunks=3, chunk_delay=0.5)
    before = app.extensions["broker"].ledger.balance(tenant.account_id)
    with requests.post(
        f"{live_server}/v1/chat/completions", json=body, headers=headers, stream=True, timeout=30
    ) as first:
        lines = first.iter_lines()
        next(lines)  # the stream has started: a retry now meets the running claim
        during = requests.post(f"{live_server}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert during.status_code == 409 and during.json()["error"]["code"] == "idempotency_key_in_flight"
        first_text = b"\n".join([b"", *lines])
    after = requests.post(f"{live_server}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert after.status_code == 200 and after.headers["Idempotent-Replayed"] == "true"
    assert after.headers["Content-Type"].startswith("text/event-stream") and b"[DONE]" in after.content
    assert b"a streamed answer"[:5] in after.content
    assert len(upstream.requests) == 1
    charged = before - app.extensions["broker"].ledger.balance(tenant.account_id)
    assert charged > 0 and b"[DONE]" in first_text
    assert_invariant(app)


def test_a_stream_too_large_to_keep_makes_a_retry_a_409_naming_the_first_request(app, live_server, tenant, upstream):
    import requests

    app.config["IDEMPOTENCY_MAX_BODY_BYTES"] = 64
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {**tenant.headers, "Idempotency-Key": "stream-big"}
    upstream.default = Reply(text="a streamed answer that is longer than sixty-four bytes of events")
    first = requests.post(f"{live_server}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert first.status_code == 200
    retry = requests.post(f"{live_server}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert retry.status_code == 409 and retry.json()["error"]["code"] == "idempotency_key_used"
    assert first.headers["X-Request-Id"] in retry.json()["error"]["message"]
    assert len(upstream.requests) == 1
    assert_invariant(app)


def test_a_key_kept_for_an_unknown_outcome_is_a_409_naming_its_request(app):
    """Issue 10 item 5: a request that failed after its hold or settle was sent keeps its key."""
    client = app.extensions["broker"].redis
    key, stored = idempotency.begin(client, 7, "stalled", b"body")
    assert stored is None
    idempotency.keep_unknown(client, key, b"body", "req_first")
    with pytest.raises(Conflict) as retry:
        idempotency.begin(client, 7, "stalled", b"body")
    assert retry.value.code == "idempotency_key_used"
    assert "GET /v1/requests/req_first" in retry.value.message
    with pytest.raises(Conflict) as other_body:
        idempotency.begin(client, 7, "stalled", b"another body")
    assert other_body.value.code == "idempotency_key_reused"
