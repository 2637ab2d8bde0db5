"""Issue 10 item 5: Redis stalled past the client's 5 s socket timeout (``DEBUG SLEEP 7``) before,
during and after a request's hold: the 503 says "nothing was charged" only when that is true, a
hold Redis runs after its request gave up is refused, and a charge that lands after the 503 is
found by the request id the 503 gave, and never made twice through the Idempotency-Key.

Each test runs the app over HTTP on a Valkey of its own started with
``--enable-debug-command local``; a second connection sends ``DEBUG SLEEP`` at the chosen moment:
before the request (its first Redis call stalls), between the key check and the hold (the body
is sent only once the sleep has begun, so the hold is the first Redis command queued behind it),
or while the provider answers (the fake upstream delays its response, so the settle is queued).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
import redis
import requests
from flask import Flask
from sqlalchemy import func, select
from werkzeug.serving import make_server

from broker import create_app, keys, limits
from broker.embedded_redis import EmbeddedRedis
from broker.ledger import keys_of
from broker.models import Job
from tests.conftest import CURRENT, Tenant, assert_invariant, make_tenant
from tests.fakes.upstreams import FakeUpstream, Reply

pytestmark = pytest.mark.slow

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "stall"}], "max_tokens": 20}
IMAGE = {"model": "openai/gpt-image-1", "prompt": "a lighthouse at dawn", "quality": "low"}
# Longer than the app's Redis socket timeout (5 s, broker.extensions), as the audit's 7 s was,
# with room to spare on a loaded machine: a command sent up to 4 s into the sleep times out.
SLEEP_SECONDS = 9
# The fake provider's answer to the stalled settle's request comes this long after the request
# reached it (the sleep begins meanwhile); the app's upstream read timeout is set above it.
UPSTREAM_DELAY = 1.5


@dataclass
class Stalling:
    app: Flask
    server: EmbeddedRedis
    url: str

    @property
    def redis(self) -> redis.Redis:
        return self.app.extensions["broker"].redis

    def stall(self) -> threading.Thread:
        """``DEBUG SLEEP`` from a connection of its own; returns once Redis has stopped answering.
        Join the thread returned to wait until Redis is awake again."""
        # from_url: clients without redis-py's default retries (a retried DEBUG SLEEP sleeps again).
        sleeper = redis.Redis.from_url(self.server.url, socket_timeout=SLEEP_SECONDS + 30)
        thread = threading.Thread(target=sleeper.execute_command, args=("DEBUG", "SLEEP", SLEEP_SECONDS))
        thread.start()
        probe = redis.Redis.from_url(self.server.url, socket_timeout=0.2)
        while True:
            try:
                probe.ping()
            except redis.TimeoutError:
                return thread  # the ping waits behind the sleep
            time.sleep(0.01)

    def balance(self, tenant: Tenant) -> int:
        return self.app.extensions["broker"].ledger.balance(tenant.account_id)

    def held(self, tenant: Tenant) -> tuple[dict, int]:
        """The account's open holds (hold id -> amount) and its held total."""
        k = keys_of(tenant.account_id)
        return self.redis.hgetall(k["holds"]), int(self.redis.get(k["held"]) or 0)

    def receipt(self, tenant: Tenant, request_id: str) -> requests.Response:
        return requests.get(f"{self.url}/v1/requests/{request_id}", headers=tenant.headers, timeout=30)


@pytest.fixture
def stalling(app, tmp_path):
    """The test app's database, on a Valkey that takes DEBUG SLEEP, served over HTTP (threaded)."""
    server = EmbeddedRedis(tmp_path / "debug-redis", appendonly=False, extra=["--enable-debug-command", "local"])
    server.start()
    stalled = create_app({**app.config["BROKER_TEST_CONFIG"], "REDIS_URL": server.url, "UPSTREAM_READ_TIMEOUT": 10.0})
    CURRENT["app"] = stalled
    http_server = make_server("127.0.0.1", 0, stalled, threaded=True)
    thread = threading.Thread(target=http_server.serve_forever, daemon=True)
    thread.start()
    yield Stalling(stalled, server, f"http://127.0.0.1:{http_server.server_port}")
    http_server.shutdown()
    thread.join(5)
    server.stop()
    stalled.extensions["broker"].db.remove()
    stalled.extensions["broker"].engine.dispose()


def _day_count(stalling: Stalling, tenant: Tenant) -> int:
    """Requests the key made today: the key check's script counts each one."""
    _, day = limits.counter_keys(keys.key_tag(keys.hash_key(tenant.key)), time.time())
    return int(stalling.redis.get(day) or 0)


def post_with_stall_before_hold(stalling: Stalling, tenant: Tenant, path: str, body: dict) -> tuple:
    """POST whose body is sent only once the key check is done and Redis sleeps: the route's
    first Redis command after reading its body, the hold, is queued behind the sleep.

    Returns (status, headers, JSON body, the sleeper thread)."""
    raw = json.dumps(body).encode()
    counted = _day_count(stalling, tenant)
    connection = http.client.HTTPConnection(urlsplit(stalling.url).netloc, timeout=60)
    connection.putrequest("POST", path)
    for name, value in {**tenant.headers, "Content-Type": "application/json", "Content-Length": str(len(raw))}.items():
        connection.putheader(name, value)
    connection.endheaders()  # the app authenticates on the headers, then waits for the body
    while _day_count(stalling, tenant) == counted:
        time.sleep(0.01)
    sleeper = stalling.stall()
    connection.send(raw)
    response = connection.getresponse()
    answer = (response.status, dict(response.getheaders()), json.loads(response.read()), sleeper)
    connection.close()
    return answer


def nothing_to_reap(stalling: Stalling) -> bool:
    """The reaper, run as if every hold's deadline had passed, finds no hold to end."""
    return stalling.app.extensions["broker"].ledger.reap_expired(now=time.time() + 10**8) == []


def assert_outcome_unknown(status: int, headers: dict, body: dict) -> str:
    """A 503 that names the request to look up and does not claim that nothing was charged."""
    request_id = headers["X-Request-Id"]
    assert status == 503, body
    assert body["error"]["code"] == "outcome_unknown", body
    assert body["request_id"] == request_id
    assert headers["x-should-retry"] == "false"  # the SDKs must not run it again by themselves
    assert f"GET /v1/requests/{request_id}" in body["error"]["message"]
    assert "nothing was charged" not in body["error"]["message"].lower()
    return request_id


def test_a_stall_before_the_hold_is_a_503_nothing_was_charged_and_nothing_is(stalling, upstream: FakeUpstream):
    tenant = make_tenant("5")
    # A charged request first, on this same thread (the test client runs the app in it): what it
    # sent to the ledger must not colour the next request's answer.
    charged = stalling.app.test_client().post("/v1/chat/completions", json=CHAT, headers=tenant.headers)
    assert charged.status_code == 200
    start = stalling.balance(tenant)
    assert start < 5_000_000
    sleeper = stalling.stall()
    response = stalling.app.test_client().post("/v1/chat/completions", json=CHAT, headers=tenant.headers)
    sleeper.join()
    assert response.status_code == 503
    assert response.json["error"]["code"] == "service_unavailable"
    assert "nothing was charged" in response.json["error"]["message"]
    assert len(upstream.requests) == 1  # only the first request reached the provider
    assert stalling.balance(tenant) == start
    assert stalling.held(tenant) == ({}, 0)
    assert_invariant(stalling.app)


def test_a_hold_queued_behind_the_stall_is_refused_and_the_503_names_the_request(stalling, upstream):
    tenant = make_tenant("5")
    start = stalling.balance(tenant)
    status, headers, body, sleeper = post_with_stall_before_hold(stalling, tenant, "/v1/chat/completions", CHAT)
    request_id = assert_outcome_unknown(status, headers, body)
    sleeper.join()
    # The hold ran when Redis woke, after its request had given up: refused, nothing held, and
    # nothing for the reaper to end (however long it waits).
    assert stalling.held(tenant) == ({}, 0)
    assert nothing_to_reap(stalling)
    assert stalling.balance(tenant) == start
    assert stalling.receipt(tenant, request_id).status_code == 404  # no charge was recorded
    assert upstream.requests == []
    assert_invariant(stalling.app)


def test_a_media_submit_whose_hold_is_queued_behind_the_stall_leaves_no_hold_and_no_job(stalling, upstream):
    tenant = make_tenant("50")
    start = stalling.balance(tenant)
    status, headers, body, sleeper = post_with_stall_before_hold(stalling, tenant, "/v1/image", IMAGE)
    request_id = assert_outcome_unknown(status, headers, body)
    sleeper.join()
    assert stalling.held(tenant) == ({}, 0)
    assert nothing_to_reap(stalling)
    assert stalling.balance(tenant) == start
    session = stalling.app.extensions["broker"].db()
    assert session.scalar(select(func.count()).select_from(Job).where(Job.account_id == tenant.account_id)) == 0
    assert stalling.receipt(tenant, request_id).status_code == 404
    assert upstream.requests == []
    assert_invariant(stalling.app)


def test_a_stall_during_the_settle_is_outcome_unknown_then_found_and_never_charged_twice(stalling, upstream):
    tenant = make_tenant("5")
    start = stalling.balance(tenant)
    headers = {**tenant.headers, "Idempotency-Key": "stall-during-settle"}
    # The provider answers after the request has reached it and Redis has gone to sleep, so the
    # settle waits behind the sleep past the client's timeout and runs when Redis wakes.
    upstream.queue(Reply(delay=UPSTREAM_DELAY))
    answer: dict = {}

    def send() -> None:
        answer["first"] = requests.post(f"{stalling.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)

    sender = threading.Thread(target=send)
    sender.start()
    while not upstream.requests:
        time.sleep(0.01)
    sleeper = stalling.stall()
    sender.join()
    sleeper.join()
    first = answer["first"]
    request_id = assert_outcome_unknown(first.status_code, dict(first.headers), first.json())

    # Once Redis is back the request id tells what was charged, and the balance agrees.
    receipt = stalling.receipt(tenant, request_id)
    assert receipt.status_code == 200, receipt.text
    charged = receipt.json()["charged_ucr"]
    assert charged > 0
    assert stalling.balance(tenant) == start - charged
    assert stalling.held(tenant) == ({}, 0)

    # The same Idempotency-Key does not run (or charge) the request again.
    retry = requests.post(f"{stalling.url}/v1/chat/completions", json=CHAT, headers=headers, timeout=60)
    assert retry.status_code == 409, retry.text
    assert retry.json()["error"]["code"] == "idempotency_key_used"
    assert request_id in retry.json()["error"]["message"]
    assert len(upstream.requests) == 1
    assert stalling.balance(tenant) == start - charged
    assert_invariant(stalling.app)


def test_a_stall_during_a_streams_settle_ends_it_with_outcome_unknown_and_charges_the_real_usage_once(
    stalling, upstream
):
    """The settle of a stream queued behind the stall: the stream ends with an ``outcome_unknown`` error
    event naming the request (not silently cut), and no second, estimated settle follows the first."""
    tenant = make_tenant("5")
    start = stalling.balance(tenant)
    # Each event after the first comes 0.5 s later: the settle is sent a second or two into the sleep.
    upstream.queue(Reply(text="one two three four", chunks=2, chunk_delay=0.5, output_tokens=7))
    response = requests.post(
        f"{stalling.url}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers=tenant.headers,
        stream=True,
        timeout=60,
    )
    lines = response.iter_lines(chunk_size=1)  # each line as it arrives
    first = next(line for line in lines if line.startswith(b"data:"))  # the stream is under way
    assert b'"role":"assistant"' in first or b"content" in first
    sleeper = stalling.stall()  # the last chunk (and the settle after it) comes while Redis sleeps
    rest = [line for line in lines if line.startswith(b"data:")]
    sleeper.join()
    request_id = response.headers["X-Request-Id"]
    error = json.loads(rest[-1][len(b"data: ") :])
    assert error["error"]["code"] == "outcome_unknown", rest
    assert f"GET /v1/requests/{request_id}" in error["error"]["message"]
    assert b"[DONE]" not in b"".join(rest)

    receipt = stalling.receipt(tenant, request_id)
    assert receipt.status_code == 200, receipt.text
    record = receipt.json()
    assert record["status"] == "ok" and record["tokens"]["output"] == 7  # the real usage, not an estimate
    assert stalling.balance(tenant) == start - record["charged_ucr"]
    assert stalling.held(tenant) == ({}, 0)
    assert_invariant(stalling.app)
