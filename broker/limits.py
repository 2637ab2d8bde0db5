"""Per-key request limits (per minute and per day) and an optional daily spend cap, counted in Redis.

The counters are keyed by the API key's hash, so their increments ride in the same
pipelined round trip as the key lookup: limiting adds no round trip to a request.
Fixed windows (the minute and the UTC day) keep it to one INCR each; the state is in
Redis, so the limits hold across any number of web processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from broker.errors import RateLimited
from broker.pricing import format_credits

DAY = 86400


@dataclass(frozen=True)
class Limits:
    per_minute: int
    per_day: int
    spend_per_day_ucr: int  # 0: no cap


def _keys(tag: str, now: float) -> tuple[str, str, str]:
    minute, day = int(now // 60), int(now // DAY)
    return f"rl:m:{tag}:{minute}", f"rl:d:{tag}:{day}", f"rl:s:{tag}:{day}"


def queue_counts(pipe, tag: str, now: float) -> None:
    """Count this request (3 commands + 2 expiries) on a pipeline that is about to run."""
    minute_key, day_key, spend_key = _keys(tag, now)
    pipe.incr(minute_key)
    pipe.expire(minute_key, 120)
    pipe.incr(day_key)
    pipe.expire(day_key, 2 * DAY)
    pipe.get(spend_key)


def check(limits: Limits, results: list, now: float) -> dict[str, str]:
    """Raise ``RateLimited`` (with Retry-After) when a limit is passed; else the X-RateLimit headers."""
    minute_count, _, day_count, _, spent = results
    spent = int(spent or 0)
    minute_reset = 60 - int(now) % 60
    day_reset = DAY - int(now) % DAY
    headers = {
        "X-RateLimit-Limit": str(limits.per_minute),
        "X-RateLimit-Remaining": str(max(0, limits.per_minute - minute_count)),
        "X-RateLimit-Reset": str(minute_reset),
    }
    if minute_count > limits.per_minute:
        raise RateLimited(
            f"Rate limit: {limits.per_minute} requests a minute for this key.",
            headers={**headers, "Retry-After": str(minute_reset)},
        )
    if day_count > limits.per_day:
        day_headers = {
            "X-RateLimit-Limit": str(limits.per_day),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": str(day_reset),
        }
        raise RateLimited(
            f"Rate limit: {limits.per_day} requests a day for this key.",
            headers={**day_headers, "Retry-After": str(day_reset)},
        )
    if limits.spend_per_day_ucr and spent >= limits.spend_per_day_ucr:
        raise RateLimited(
            f"Daily spend cap reached: {format_credits(limits.spend_per_day_ucr)} credits a day for this key.",
            code="spend_cap_reached",
            headers={**headers, "Retry-After": str(day_reset)},
        )
    return headers


def queue_spend(pipe, tag: str, charged_ucr: int, now: float | None = None) -> None:
    """Add a charge to the key's spend of the day (pipelined with the settle)."""
    if charged_ucr > 0 and tag:
        _, _, spend_key = _keys(tag, now or time.time())
        pipe.incrby(spend_key, charged_ucr)
        pipe.expire(spend_key, 2 * DAY)
