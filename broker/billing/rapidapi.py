"""RapidAPI marketplace mode: requests forwarded by RapidAPI's proxy, identified by its headers.

RapidAPI bills its subscribers, so such requests take no credit hold; they are still
metered (a usage row with the provider cost and a zero charge) and limited per plan
(``X-RapidAPI-Subscription``). Only ``X-RapidAPI-Proxy-Secret``, ``X-RapidAPI-User`` and
``X-RapidAPI-Subscription`` are trusted, and only when the secret matches.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime

import redis
from sqlalchemy import select

from broker.accounts import MARKETPLACE_DOMAIN
from broker.errors import AuthenticationFailed, RateLimited
from broker.keys import Caller
from broker.models import Account

HEADERS = ("X-RapidAPI-Proxy-Secret", "X-RapidAPI-User", "X-RapidAPI-Subscription")
USER = re.compile(r"^[A-Za-z0-9_.@-]{1,100}$")
CACHE = "rapidapi:user:"


def is_marketplace_request(headers: Mapping[str, str]) -> bool:
    return any(name in headers for name in HEADERS)


def authenticate(
    client: redis.Redis, session_factory, secret: str, plans: dict[str, int], headers: Mapping[str, str]
) -> Caller:
    """The marketplace caller, or 401 (bad or missing secret, no user) / 429 (plan limit)."""
    given = headers.get("X-RapidAPI-Proxy-Secret") or ""
    if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
        raise AuthenticationFailed("Invalid RapidAPI proxy secret.", code="invalid_proxy_secret")
    user = headers.get("X-RapidAPI-User") or ""
    if not USER.match(user):
        raise AuthenticationFailed("Missing or invalid X-RapidAPI-User.", code="invalid_marketplace_user")
    plan = (headers.get("X-RapidAPI-Subscription") or "BASIC").upper()
    account_id = _account_id(client, session_factory, user)
    _limit(client, user, plans.get(plan, plans.get("BASIC", 30)))
    return Caller(account_id, 0, marketplace=plan)


def _account_id(client: redis.Redis, session_factory, user: str) -> int:
    cached = client.get(CACHE + user)
    if cached:
        return int(cached)
    session = session_factory()
    email = f"{user.lower()}@{MARKETPLACE_DOMAIN}"
    account = session.scalar(select(Account).where(Account.email == email))
    if account is None:
        account = Account(email=email, source="rapidapi", email_verified_at=datetime.now(UTC))
        session.add(account)
        try:
            session.commit()
        except Exception:
            session.rollback()
            account = session.scalar(select(Account).where(Account.email == email))
    if account.source != "rapidapi":
        # Not one of ours: nobody may stand in for a marketplace user (the domain is reserved).
        raise AuthenticationFailed("Missing or invalid X-RapidAPI-User.", code="invalid_marketplace_user")
    client.set(CACHE + user, account.id, ex=3600)
    return account.id


def _limit(client: redis.Redis, user: str, per_minute: int) -> None:
    """A fixed one-minute window per marketplace user: one pipelined round trip."""
    window = int(time.time() // 60)
    key = f"rapidapi:rate:{user}:{window}"
    pipe = client.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, 120)
    count, _ = pipe.execute()
    if count > per_minute:
        retry = 60 - int(time.time()) % 60
        raise RateLimited(
            f"Your RapidAPI plan allows {per_minute} requests a minute.",
            headers={"Retry-After": str(retry), "X-RateLimit-Limit": str(per_minute), "X-RateLimit-Remaining": "0"},
        )
