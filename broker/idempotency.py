"""``Idempotency-Key`` for POST requests: the first response is kept for 24 h and replayed to retries.

The same key with the same body replays the first response (``Idempotent-Replayed:
true``) and is charged once; with a different body it is a 409; while the first is
still running, a retry gets a 409 too. Server errors (5xx) and rate limits are not
kept, so a retry can run again — unless a hold or settle may have reached the ledger
before the error (``keep_unknown``): then the key stays used, and a retry gets a 409
naming the first request, whose receipt says what was charged. A streamed answer keeps
the key claimed while it streams and is kept once it has ended (``finish_stream``):
retries get the whole stream again, or, when it was too large to keep, a 409 naming the
first request — never a second charge.

What an account can store is bounded: a response body over ``max_body_bytes`` is not
kept (a retry runs again), and an account holds at most ``max_keys`` keys at once
(counted in a sorted set by expiry); one more new key is refused with a 429
(``too_many_idempotency_keys``, Retry-After: when the oldest expires) rather than run
without the protection the client asked for.
"""

from __future__ import annotations

import hashlib
import json
import math
import time

import redis

from broker.errors import Conflict, InvalidRequest, RateLimited

TTL_SECONDS = 24 * 3600
# A claim whose request never finished (its process died) frees itself after this.
RUNNING_TTL_SECONDS = 600
PREFIX = "idem:"
MAX_BODY_BYTES = 256 * 1024
MAX_KEYS = 1000


def _key(account_id: int, idempotency_key: str) -> str:
    if not 1 <= len(idempotency_key) <= 255:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters.", param="Idempotency-Key")
    return f"{PREFIX}{account_id}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"


def _index(key: str) -> tuple[str, str]:
    """The account's sorted set of held keys (scored by expiry) and this key's member in it."""
    account, digest = key[len(PREFIX) :].split(":")
    return f"{PREFIX}{account}:held", digest


def begin(
    client: redis.Redis, account_id: int, idempotency_key: str, body: bytes, max_keys: int = MAX_KEYS
) -> tuple[str, dict | None]:
    """Claim the key for this request; returns (redis key, the stored response to replay or None)."""
    key = _key(account_id, idempotency_key)
    fingerprint = hashlib.sha256(body).hexdigest()
    claim = json.dumps({"state": "running", "body": fingerprint})
    if client.set(key, claim, nx=True, ex=RUNNING_TTL_SECONDS):
        _hold(client, key, max_keys)
        return key, None
    stored = json.loads(client.get(key) or claim)
    if stored["body"] != fingerprint:
        raise Conflict(
            "This Idempotency-Key was used with a different request body.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    if stored["state"] == "running":
        raise Conflict(
            "A request with this Idempotency-Key is still running; retry shortly.",
            param="Idempotency-Key",
            code="idempotency_key_in_flight",
        )
    first = stored.get("unknown") or stored.get("too_large")
    if first:
        why = (
            "which ended while the service was unavailable, so it was not run again"
            if stored.get("unknown")
            else "a stream too large to replay"
        )
        raise Conflict(
            f"This Idempotency-Key was used by request {first}, {why}; GET /v1/requests/{first} shows its "
            "receipt and what was charged (a 404: nothing was).",
            param="Idempotency-Key",
            code="idempotency_key_used",
        )
    return key, stored


def _hold(client: redis.Redis, key: str, max_keys: int) -> None:
    """Count a new key against the account's cap; over it, free the claim and raise ``RateLimited``."""
    index, member = _index(key)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.zremrangebyscore(index, "-inf", now)
    pipe.zadd(index, {member: now + TTL_SECONDS})
    pipe.expire(index, TTL_SECONDS)
    pipe.zcard(index)
    pipe.zrange(index, 0, 0, withscores=True)
    *_, held, oldest = pipe.execute()
    if held <= max_keys:
        return
    _free(client, key)
    retry_after = max(1, math.ceil(oldest[0][1] - now)) if oldest else TTL_SECONDS
    raise RateLimited(
        f"This account holds {max_keys} Idempotency-Keys from the last 24 hours, the most it can; "
        "retry later, or send the request without one.",
        param="Idempotency-Key",
        code="too_many_idempotency_keys",
        headers={"Retry-After": str(retry_after)},
    )


def _free(client: redis.Redis, key: str) -> None:
    index, member = _index(key)
    pipe = client.pipeline(transaction=False)
    pipe.delete(key)
    pipe.zrem(index, member)
    pipe.execute()


def finish(
    client: redis.Redis,
    key: str,
    body: bytes,
    status: int,
    headers: dict,
    data: bytes | None,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    """Keep the response for replays, or free the key when it must not (or is too large to) be kept."""
    if data is None or status >= 500 or status == 429 or len(data) > max_body_bytes:
        _free(client, key)
        return
    stored = {
        "state": "done",
        "body": hashlib.sha256(body).hexdigest(),
        "status": status,
        "headers": headers,
        "data": data.decode(),
    }
    client.set(key, json.dumps(stored), ex=TTL_SECONDS)


def finish_stream(
    client: redis.Redis,
    key: str,
    body: bytes,
    status: int,
    headers: dict,
    data: bytes | None,
    request_id: str,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> None:
    """Keep a streamed answer once it has ended: whole for replays, or (``data`` None or over
    the bound) a marker naming the request, so a retry gets a 409 rather than a second charge."""
    if data is not None and len(data) <= max_body_bytes:
        finish(client, key, body, status, headers, data, max_body_bytes)
        return
    stored = {"state": "done", "body": hashlib.sha256(body).hexdigest(), "too_large": request_id}
    client.set(key, json.dumps(stored), ex=TTL_SECONDS)


def keep_unknown(client: redis.Redis, key: str, body: bytes, request_id: str) -> None:
    """The request failed after a hold or settle may have reached the ledger: keep the key used,
    naming the request, so a retry gets a 409 instead of running (and being charged) again."""
    stored = {"state": "done", "body": hashlib.sha256(body).hexdigest(), "unknown": request_id}
    client.set(key, json.dumps(stored), ex=TTL_SECONDS)


def bind_job(client: redis.Redis, key: str, body: bytes, job_id: str) -> None:
    """Answer retries of this key from a media job instead of a stored response.

    A synchronous media route binds its key as soon as the job (and its hold) exists, so
    whatever the first answer is — the result, or a 504 while the job still runs — a retry
    waits for the same job and gets its result; the job is charged once.
    """
    stored = {"state": "done", "body": hashlib.sha256(body).hexdigest(), "job_id": job_id}
    client.set(key, json.dumps(stored), ex=TTL_SECONDS)


def abandon(client: redis.Redis, key: str) -> None:
    """The request died with an unhandled error: let a retry run."""
    _free(client, key)
