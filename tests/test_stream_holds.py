"""Streams that outlive their hold's deadline (issue 10 item 3).

A stream read slowly keeps its hold alive and is charged in full; a stream whose process stops
settling (a crash, a restart that cut it) is charged the estimate it recorded, by the reaper; a
settle that arrives after the expiry books the rest. Tokens delivered are never given away.
"""

from __future__ import annotations

import time

import pytest

from broker import create_app
from tests.conftest import assert_invariant
from tests.fakes.upstreams import Reply

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
MODELS = ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5", "gemini/gemini-2.5-flash"]
HOLD_TTL = 1  # seconds: the stream below runs for several of them


@pytest.fixture
def short_holds(app):
    """The test app with holds that expire after a second and streams that record progress at every event."""
    config = {**app.config["BROKER_TEST_CONFIG"], "HOLD_TTL_SECONDS": HOLD_TTL, "STREAM_PROGRESS_SECONDS": 0}
    short = create_app(config)
    yield short
    short.extensions["broker"].db.remove()
    short.extensions["broker"].engine.dispose()


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


def receipt(app, tenant, request_id: str) -> dict:
    answer = app.test_client().get(f"/v1/requests/{request_id}", headers=tenant.headers)
    assert answer.status_code == 200, answer.json
    return answer.json


def stream(app, tenant, model: str):
    response = app.test_client().post(
        "/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "max_tokens": 300, "stream": True},
        headers=tenant.headers,
        buffered=False,
    )
    assert response.status_code == 200
    return response, response.response


@pytest.mark.parametrize("model", MODELS)
def test_a_stream_read_slowly_past_its_hold_deadline_keeps_its_hold_and_is_charged_in_full(
    app, short_holds, tenant, upstream, model
):
    upstream.queue(Reply(text="word " * 30, chunks=6, output_tokens=40))
    ledger = short_holds.extensions["broker"].ledger
    before = balance(app, tenant)
    response, chunks = stream(short_holds, tenant, model)
    request_id = response.headers["X-Request-Id"]
    body = []
    for chunk in chunks:
        body.append(chunk)
        time.sleep(HOLD_TTL * 0.3)  # a slow reader (an event may be two lines): the stream outlives its first deadline
        assert ledger.reap_expired() == [], "the reaper expired the hold of a live stream"
    response.close()
    assert b"[DONE]" in b"".join(body)
    record = receipt(short_holds, tenant, request_id)
    assert record["status"] == "ok" and record["flags"]["estimated"] is False
    assert record["tokens"]["output"] == 40 and record["charged_ucr"] > 0
    assert before - balance(app, tenant) == record["charged_ucr"]
    assert_invariant(app)


@pytest.mark.parametrize("model", MODELS)
def test_a_stream_that_stops_settling_is_charged_its_recorded_estimate_then_the_rest_late(
    app, short_holds, tenant, upstream, model
):
    upstream.queue(Reply(text="word " * 40, chunks=8, output_tokens=50))
    ledger = short_holds.extensions["broker"].ledger
    before = balance(app, tenant)
    response, chunks = stream(short_holds, tenant, model)
    request_id = response.headers["X-Request-Id"]
    delivered = [next(chunks) for _ in range(4)]
    assert any(b"word" in chunk for chunk in delivered)
    # The process serving it stops (frozen here: the generator is never resumed) and the deadline passes.
    reaped = ledger.reap_expired(now=time.time() + HOLD_TTL + 5)
    assert [hold_id for _, hold_id, _ in reaped] == [request_id]
    expired = receipt(short_holds, tenant, request_id)
    assert expired["status"] == "expired" and 0 < expired["charged_ucr"] <= expired["hold_ucr"]
    assert before - balance(app, tenant) == expired["charged_ucr"]  # what it had delivered, not nothing
    # The stream was alive after all: it ends, and its settle books the rest of the real usage.
    rest = list(chunks)
    response.close()
    assert b"[DONE]" in b"".join(rest)
    final = receipt(short_holds, tenant, request_id)
    assert final["tokens"]["output"] == 50 and final["charged_ucr"] > expired["charged_ucr"]
    assert before - balance(app, tenant) == final["charged_ucr"]
    assert_invariant(app)


def test_a_stream_cut_by_a_graceful_restart_is_charged_what_it_delivered(app, tmp_path, tenant, upstream):
    """gunicorn stops (SIGTERM) while a stream runs longer than its graceful timeout: the stream is cut
    and its worker killed, yet what it delivered is charged (it recorded it on its hold), not nothing."""
    import signal

    import requests

    from tests.conftest import GunicornProcess

    upstream.queue(Reply(text="word " * 60, chunks=30, chunk_delay=0.5, output_tokens=80))
    ledger = app.extensions["broker"].ledger
    before = balance(app, tenant)
    with GunicornProcess(app, tmp_path, GUNICORN_GRACEFUL_TIMEOUT="1", STREAM_PROGRESS_SECONDS="0") as server:
        response = requests.post(
            f"{server.base}/v1/chat/completions",
            json={"model": "openai/gpt-4o-mini", "messages": MESSAGES, "max_tokens": 300, "stream": True},
            headers=tenant.headers,
            stream=True,
            timeout=30,
        )
        request_id = response.headers["X-Request-Id"]
        lines = response.iter_lines(chunk_size=1)
        delivered = [line for _, line in zip(range(8), (x for x in lines if x.startswith(b"data:")), strict=False)]
        assert any(b"word" in line for line in delivered)
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
        response.close()
    ledger.reap_expired(now=time.time() + 10**6)  # the reaper, whenever it runs after the restart
    record = receipt(app, tenant, request_id)
    assert record["status"] in ("expired", "partial"), record
    assert 0 < record["charged_ucr"] <= record["hold_ucr"]
    assert record["tokens"]["output"] < 80 or record["status"] == "expired"  # far from the whole answer
    assert before - balance(app, tenant) == record["charged_ucr"]
    assert_invariant(app)
