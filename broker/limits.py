"""Per-key request limits (per minute and per day), the daily spend cap's refusal, and failed log-ins per client.

The counters are named by the API key's hash tag, so ``keys.authenticate``'s one
script reads the key's cache entry and counts the request in the same round trip:
limiting adds no round trip to a request, and only a key the cache names as live is
ever counted. Fixed windows (the minute and the UTC day) keep it to one INCR each; the
state is in Redis, so the limits hold across any number of web processes. The spend
cap is kept by the ledger's hold script (each hold reserves its amount on the key's
spend of the day, in the account's slot), so concurrent requests cannot overshoot it.

Failed authentications are counted per client (its address) in one counter per
minute, so guessing keys costs Redis one small expiring key per client, not one per
guess.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from broker.errors import BrokerError, RateLimited, ServiceUnavailable
from broker.pricing import format_credits

DAY = 86400


@dataclass(frozen=True)
class Limits:
    per_minute: int
    per_day: int
    spend_per_day_ucr: int  # 0: no cap


MINUTE_COUNTER_TTL = 120
DAY_COUNTER_TTL = 2 * DAY
FAILURES = "authfail:"


def counter_keys(tag: str, now: float) -> tuple[str, str]:
    """The key's counters of this minute and day; ``tag`` is its hash tag."""
    minute, day = int(now // 60), int(now // DAY)
    return f"rl:m:{tag}:{minute}", f"rl:d:{tag}:{day}"


def check(limits: Limits, minute_count: int, day_count: int, now: float) -> dict[str, str]:
    """Raise ``RateLimited`` (with Retry-After) when a limit is passed; else the X-RateLimit headers."""
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
    return headers


def hold_refusal(why: str, cap_ucr: int) -> BrokerError | None:
    """The error for a hold the ledger refused other than for the balance (``Hold.why``); None for the balance."""
    if why == "cap":
        return spend_cap_reached(cap_ucr)
    if why == "late":
        # Redis answered after this request's call to it had timed out; nothing is held.
        return ServiceUnavailable("The service is temporarily unavailable; nothing was charged.")
    return None


def spend_cap_reached(cap_ucr: int, now: float | None = None) -> RateLimited:
    """The 429 for a hold the key's daily spend cap (kept by the ledger's holds) cannot afford."""
    day_reset = DAY - int(now or time.time()) % DAY
    return RateLimited(
        f"Daily spend cap reached: {format_credits(cap_ucr)} credits a day for this key "
        "(what its requests spent today plus what those still running hold).",
        code="spend_cap_reached",
        headers={"Retry-After": str(day_reset)},
    )


def failures_key(client_id: str, now: float) -> str:
    """The one counter of failed authentications for this client and minute."""
    return f"{FAILURES}{client_id}:{int(now // 60)}"


def refuse_failures(failures: int, limit: int, now: float) -> None:
    """``RateLimited`` once a client has failed to authenticate more than ``limit`` times this minute."""
    if failures > limit:
        raise RateLimited(
            f"Too many requests with invalid API keys from your address: at most {limit} a minute.",
            code="too_many_failed_authentications",
            headers={"Retry-After": str(60 - int(now) % 60)},
        )
