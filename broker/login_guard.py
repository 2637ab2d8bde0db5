"""Guessing limits for web log-in that never lock the owner out.

Guesses are limited per (email, client) and per client by the log-in view (flask-limiter,
failures only). Against many clients guessing one email, each failure past the first
``FREE_FAILURES`` in an hour makes the next attempt for that email wait longer (1 s, 2 s,
4 s … up to ``MAX_DELAY_SECONDS``) — except from a browser that has logged into that
email before (a signed device cookie), so the owner is never shut out; and the emailed
password link is never limited by any of this (setting a password clears the count).
Failures are counted for unknown emails too, so a delay tells nothing about who exists.
"""

from __future__ import annotations

import hashlib
import math
import time

import redis

FREE_FAILURES = 5
MAX_DELAY_SECONDS = 60
WINDOW_SECONDS = 3600
PREFIX = "login:fail:"


def _key(email: str) -> str:
    return PREFIX + hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]


def delay_after(failures: int) -> int:
    """Seconds the next attempt must wait after ``failures`` recent failures."""
    return 0 if failures < FREE_FAILURES else min(MAX_DELAY_SECONDS, 2 ** (failures - FREE_FAILURES))


def wait_seconds(client: redis.Redis, email: str, now: float | None = None) -> int:
    """How long an attempt for ``email`` must still wait (0: go ahead)."""
    failures, last = client.hmget(_key(email), "n", "t")
    if not failures:
        return 0
    remaining = float(last or 0) + delay_after(int(failures)) - (now or time.time())
    return max(0, math.ceil(remaining))


def record_failure(client: redis.Redis, email: str, now: float | None = None) -> None:
    key = _key(email)
    pipe = client.pipeline(transaction=False)
    pipe.hincrby(key, "n", 1)
    pipe.hset(key, "t", str(now or time.time()))
    pipe.expire(key, WINDOW_SECONDS)
    pipe.execute()


def clear(client: redis.Redis, email: str) -> None:
    """The owner got in (or set a password by emailed link): forget the failures."""
    client.delete(_key(email))
