"""``Idempotency-Key`` for POST requests: the first response is kept for 24 h and replayed to retries.

The same key with the same body replays the first response (``Idempotent-Replayed:
true``) and is charged once; with a different body it is a 409; while the first is
still running, a retry gets a 409 too. Server errors (5xx) and rate limits are not
kept, so a retry can run again; a streamed response cannot be replayed and is not
kept either.
"""

from __future__ import annotations

import hashlib
import json

import redis

from broker.errors import Conflict, InvalidRequest

TTL_SECONDS = 24 * 3600
# A claim whose request never finished (its process died) frees itself after this.
RUNNING_TTL_SECONDS = 600
PREFIX = "idem:"


def _key(account_id: int, idempotency_key: str) -> str:
    if not 1 <= len(idempotency_key) <= 255:
        raise InvalidRequest("Idempotency-Key must be 1 to 255 characters.", param="Idempotency-Key")
    return f"{PREFIX}{account_id}:{hashlib.sha256(idempotency_key.encode()).hexdigest()}"


def begin(client: redis.Redis, account_id: int, idempotency_key: str, body: bytes) -> tuple[str, dict | None]:
    """Claim the key for this request; returns (redis key, the stored response to replay or None)."""
    key = _key(account_id, idempotency_key)
    fingerprint = hashlib.sha256(body).hexdigest()
    claim = json.dumps({"state": "running", "body": fingerprint})
    if client.set(key, claim, nx=True, ex=RUNNING_TTL_SECONDS):
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
    return key, stored


def finish(client: redis.Redis, key: str, body: bytes, status: int, headers: dict, data: bytes | None) -> None:
    """Keep the response for replays, or free the key when it must not be kept."""
    if data is None or status >= 500 or status == 429:
        client.delete(key)
        return
    stored = {
        "state": "done",
        "body": hashlib.sha256(body).hexdigest(),
        "status": status,
        "headers": headers,
        "data": data.decode(),
    }
    client.set(key, json.dumps(stored), ex=TTL_SECONDS)


def abandon(client: redis.Redis, key: str) -> None:
    """The request died with an unhandled error: let a retry run."""
    client.delete(key)
