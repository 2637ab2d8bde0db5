"""API keys: generation with a checksum, hashing, creation, revocation and cached lookup.

A key is ``brk_live_`` + 32 random base62 characters + a 6-character base62
CRC32 of them. The prefix lets secret scanners find leaked keys; the checksum
rejects mistyped or invented keys without a lookup. Only the SHA-256 of a key is
stored. Lookups are cached in Redis; revoking deletes the cache entry at once.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker import limits
from broker.errors import AuthenticationFailed, NotFound
from broker.limits import Limits
from broker.models import Account, ApiKey

PREFIX = "brk_live_"
BODY_LENGTH = 32
CHECK_LENGTH = 6
ALPHABET = string.digits + string.ascii_letters
CACHE = "apikey:"
LAST_USED = "apikey:last-used"


def _base62(number: int, width: int) -> str:
    chars = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        chars.append(ALPHABET[digit])
    return "".join(reversed(chars))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), CHECK_LENGTH)


def generate() -> str:
    body = "".join(secrets.choice(ALPHABET) for _ in range(BODY_LENGTH))
    return PREFIX + body + _checksum(body)


def well_formed(key: str) -> bool:
    """True when ``key`` has our prefix, length, alphabet and a matching checksum."""
    if len(key) != len(PREFIX) + BODY_LENGTH + CHECK_LENGTH or not key.startswith(PREFIX):
        return False
    body, check = key[len(PREFIX) : -CHECK_LENGTH], key[-CHECK_LENGTH:]
    return all(c in ALPHABET for c in body) and _checksum(body) == check


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def display_prefix(key: str) -> str:
    return key[: len(PREFIX) + 6]


@dataclass(frozen=True)
class Caller:
    """Who is calling: the account, the key (0 for a marketplace caller) and, for a
    RapidAPI request, its plan (such callers are metered, not charged)."""

    account_id: int
    key_id: int
    marketplace: str | None = None
    rate_tag: str = ""  # what the key's rate counters are named by


def create_key(
    session: Session,
    account: Account,
    name: str = "",
    expires_at: datetime | None = None,
    source: str = "cli",
) -> tuple[ApiKey, str]:
    """Create and commit a key; returns the row and the plain key, which is never stored."""
    plain = generate()
    row = ApiKey(
        account_id=account.id,
        name=name[:100],
        prefix=display_prefix(plain),
        key_hash=hash_key(plain),
        expires_at=expires_at,
        source=source,
    )
    session.add(row)
    session.commit()
    return row, plain


def revoke_key(session: Session, client: redis.Redis, account_id: int, key_id: int) -> ApiKey:
    """Revoke one of the account's keys, effective at once; ``NotFound`` for anyone else's."""
    row = session.get(ApiKey, key_id)
    if row is None or row.account_id != account_id:
        raise NotFound("No such API key.", param="key_id")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        session.commit()
    client.delete(CACHE + row.key_hash)
    return row


def authenticate(
    client: redis.Redis, session_factory, key: str | None, cache_seconds: int, defaults: Limits
) -> tuple[Caller, dict[str, str]]:
    """The caller a key belongs to and its X-RateLimit headers; ``AuthenticationFailed`` or ``RateLimited``.

    One pipelined Redis round trip when cached: the cache GET and the key's rate
    counters together; the SQL lookup (and caching) happens only on a miss. The cache
    stores "account:key:expiry:per-minute:per-day:spend-cap" (empty fields: the
    defaults) or "-" for a well-formed key that matched nothing, so guessing costs no
    SQL either.
    """
    if not key:
        raise AuthenticationFailed(
            "Missing API key. Send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
            code="missing_api_key",
        )
    if not well_formed(key):
        raise AuthenticationFailed("Invalid API key.")
    digest = hash_key(key)
    now = time.time()
    pipe = client.pipeline(transaction=False)
    pipe.get(CACHE + digest)
    limits.queue_counts(pipe, digest[:24], now)
    cached, *counts = pipe.execute()
    if cached is None:
        cached = _lookup(session_factory, digest)
        client.set(CACHE + digest, cached, ex=cache_seconds)
    if cached == "-":
        raise AuthenticationFailed("Invalid API key.")
    account_id, key_id, expires, per_minute, per_day, cap = cached.split(":")
    if expires and float(expires) <= now:
        raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
    own = Limits(
        int(per_minute or defaults.per_minute),
        int(per_day or defaults.per_day),
        int(cap or defaults.spend_per_day_ucr),
    )
    headers = limits.check(own, counts, now)
    return Caller(int(account_id), int(key_id), rate_tag=digest[:24]), headers


def _lookup(session_factory, digest: str) -> str:
    session = session_factory()
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    if row is None or row.revoked_at is not None:
        return "-"
    expires = row.expires_at
    if expires is not None and expires.tzinfo is None:
        expires = expires.replace(tzinfo=UTC)
    fields = (row.rate_per_minute, row.rate_per_day, row.spend_per_day_ucr)
    overrides = ":".join("" if value is None else str(value) for value in fields)
    return f"{row.account_id}:{row.id}:{expires.timestamp() if expires else ''}:{overrides}"


def set_limits(
    session: Session,
    client: redis.Redis,
    key_id: int,
    per_minute: int | None,
    per_day: int | None,
    spend_per_day_ucr: int | None,
) -> ApiKey:
    """Override a key's limits (None: the server default); effective at once (cache cleared)."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"No API key {key_id}.", param="key_id")
    row.rate_per_minute, row.rate_per_day, row.spend_per_day_ucr = per_minute, per_day, spend_per_day_ucr
    session.commit()
    client.delete(CACHE + row.key_hash)
    return row


def stamp_use(pipe, caller: Caller, charged_ucr: int = 0) -> None:
    """Queue a last-used stamp and the day's spend on a settle pipeline; ``flush_last_used`` moves stamps to SQL."""
    if caller.key_id:
        pipe.hset(LAST_USED, str(caller.key_id), str(int(time.time())))
    limits.queue_spend(pipe, caller.rate_tag, charged_ucr)


def flush_last_used(session: Session, client: redis.Redis) -> int:
    stamps = client.hgetall(LAST_USED)
    for key_id, ts in stamps.items():
        row = session.get(ApiKey, int(key_id))
        if row is not None:
            row.last_used_at = datetime.fromtimestamp(int(ts), UTC)
    session.commit()
    if stamps:
        client.hdel(LAST_USED, *stamps.keys())
    return len(stamps)
