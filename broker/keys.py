"""API keys: generation with a checksum, hashing, creation, revocation and cached lookup.

A key is ``brk_live_`` + 32 random base62 characters + a 6-character base62
CRC32 of them. The prefix lets secret scanners find leaked keys; the checksum
rejects mistyped or invented keys without a lookup. Only the SHA-256 of a key is
stored.

Lookups are cached in Redis under the key's hash tag ``{k:<24 hex of its hash>}``, with
its rate counters in the same slot, so one script reads the entry and counts the
request in one round trip (and runs unchanged on Redis Cluster). The checksum format
is public, so a well-formed key proves nothing: only a key the cache names as live is
counted; an unknown key is remembered for a few seconds only and costs its client one
failure on a per-minute counter (``limits``), and a client past the limit gets no
more SQL lookups until the minute ends.

Revoking writes a tombstone over the cache entry, and a cache fill never replaces an
entry (it is a SET if absent, inside the script), so a request that read the key's row
before the revocation cannot bring the key back: once ``revoke_key`` returns, the key
never authenticates again.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import time
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NoReturn

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from broker import limits
from broker.errors import AuthenticationFailed, Conflict, NotFound
from broker.limits import Limits
from broker.models import Account, ApiKey

PREFIX = "brk_live_"
BODY_LENGTH = 32
CHECK_LENGTH = 6
ALPHABET = string.digits + string.ascii_letters
CACHE = "apikey:"
LAST_USED = "apikey:last-used"
TOMBSTONE = "-"  # the cache entry of a revoked or unknown key
# A tombstone outlives any cache entry (authenticate caps KEY_CACHE_SECONDS at this) and
# any request that read the key's row before the revocation.
TOMBSTONE_SECONDS = 86400
# Guesses are new keys each time: a long negative cache would only grow Redis.
UNKNOWN_KEY_CACHE_SECONDS = 5
MAX_KEYS_PER_ACCOUNT = 100
AUTH_FAILURES_PER_MINUTE = 30
DEFAULT_CACHE_SECONDS = 300

# KEYS: cache entry, minute counter, day counter (one hash tag)
# ARGV: an entry to store when there is none ('' = none), its TTL, the counters' TTLs
# Returns {} (no entry), {tombstone}, or {entry, minute count, day count}.
AUTH_SCRIPT = r"""
local entry = redis.call('GET', KEYS[1])
if not entry and ARGV[1] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  entry = ARGV[1]
end
if not entry then return {} end
if entry == '-' then return {entry} end
local minute = redis.call('INCR', KEYS[2])
if minute == 1 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
local day = redis.call('INCR', KEYS[3])
if day == 1 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
return {entry, minute, day}
"""

# KEYS: cache entry. ARGV: entry, TTL. Never replaces a tombstone: a revoked key stays revoked.
PUT_SCRIPT = r"""
if redis.call('GET', KEYS[1]) == '-' then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""

SCRIPTS = {"auth": AUTH_SCRIPT, "put": PUT_SCRIPT}
SHAS = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in SCRIPTS.items()}


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


def key_tag(digest: str) -> str:
    """The Redis hash tag of a key's cache entry and rate counters."""
    return "{k:" + digest[:24] + "}"


def cache_key(digest: str) -> str:
    return f"{CACHE}{key_tag(digest)}:{digest}"


def _script(client: redis.Redis, name: str, keys: list[str], args: list) -> list | int:
    """Run one of ``SCRIPTS`` by its SHA; load it and retry once if the server does not have it."""
    # ``execute_command``, as the ledger does: it routes by the keys on Redis Cluster too.
    command = ("EVALSHA", SHAS[name], len(keys), *keys, *args)
    try:
        return client.execute_command(*command)
    except redis.exceptions.NoScriptError:
        client.script_load(SCRIPTS[name])
        return client.execute_command(*command)


@dataclass(frozen=True)
class Caller:
    """Who is calling: the account, the key (0 for a marketplace caller) and, for a
    RapidAPI request, its plan (such callers are metered, not charged)."""

    account_id: int
    key_id: int
    marketplace: str | None = None
    rate_tag: str = ""  # what the key's rate counters are named by
    spend_cap_ucr: int = 0  # the key's daily spend cap (0: none), kept by the ledger's holds


def create_key(
    session: Session,
    account: Account,
    name: str = "",
    expires_at: datetime | None = None,
    source: str = "cli",
    max_active: int = MAX_KEYS_PER_ACCOUNT,
) -> tuple[ApiKey, str]:
    """Create and commit a key; returns the row and the plain key, which is never stored.

    ``Conflict`` (409, ``too_many_keys``) when the account already holds ``max_active``
    unrevoked keys (0: no cap).
    """
    # Locks the account row on PostgreSQL, so two creations at once cannot both pass the count.
    session.execute(select(Account.id).where(Account.id == account.id).with_for_update())
    active = session.scalar(
        select(func.count()).select_from(ApiKey).where(ApiKey.account_id == account.id, ApiKey.revoked_at.is_(None))
    )
    if max_active and active >= max_active:
        session.rollback()
        raise Conflict(
            f"This account already has {active} active API keys, the most it can hold: revoke one to create another.",
            code="too_many_keys",
        )
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
    # A tombstone, not a delete: a request that read the row before the commit fills the
    # cache only where there is no entry, so it can no longer bring the key back.
    pipe = client.pipeline(transaction=False)
    pipe.set(cache_key(row.key_hash), TOMBSTONE, ex=TOMBSTONE_SECONDS)
    pipe.delete(CACHE + row.key_hash)  # the name before hash tags, read by processes not yet on this release
    pipe.execute()
    return row


def authenticate(
    client: redis.Redis,
    session_factory,
    key: str | None,
    cache_seconds: int,
    defaults: Limits,
    client_id: str = "",
    failures_per_minute: int = AUTH_FAILURES_PER_MINUTE,
) -> tuple[Caller, dict[str, str]]:
    """The caller a key belongs to and its X-RateLimit headers; ``AuthenticationFailed`` or ``RateLimited``.

    A cached key costs one Redis round trip: the script that reads the cache entry and,
    when it names a live key, counts the request. A miss looks the key up in SQL (unless
    ``client_id`` already failed ``failures_per_minute`` times this minute: 429) and
    fills the cache in the same script call that counts. The entry is
    "account:key:expiry:per-minute:per-day:spend-cap" (empty fields: the defaults), or
    the tombstone "-" for a revoked key (or, for a few seconds, an unknown one).
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
    reply = _count(client, digest, now)
    if not reply:
        reply = _fill(
            client, session_factory, digest, now, min(cache_seconds, TOMBSTONE_SECONDS), client_id, failures_per_minute
        )
    if reply[0] == TOMBSTONE:
        _refuse(client, client_id, now, failures_per_minute)
    entry, minute_count, day_count = reply
    account_id, key_id, expires, per_minute, per_day, cap = entry.split(":")
    if expires and float(expires) <= now:
        raise AuthenticationFailed("This API key has expired.", code="expired_api_key")
    own = Limits(
        int(per_minute or defaults.per_minute),
        int(per_day or defaults.per_day),
        int(cap or defaults.spend_per_day_ucr),
    )
    headers = limits.check(own, int(minute_count), int(day_count), now)
    caller = Caller(int(account_id), int(key_id), rate_tag=key_tag(digest), spend_cap_ucr=own.spend_per_day_ucr)
    return caller, headers


def _count(client: redis.Redis, digest: str, now: float, fill: str = "", fill_seconds: int = 0) -> list:
    """The key's cache entry (stored first when absent and ``fill`` is given) and, for a live key, its counts."""
    minute_key, day_key = limits.counter_keys(key_tag(digest), now)
    return _script(
        client,
        "auth",
        [cache_key(digest), minute_key, day_key],
        [fill, fill_seconds, limits.MINUTE_COUNTER_TTL, limits.DAY_COUNTER_TTL],
    )


def _fill(
    client: redis.Redis, session_factory, digest: str, now: float, cache_seconds: int, client_id: str, limit: int
) -> list:
    """A cache miss: look the key up in SQL, then store and count it; an unknown key is refused."""
    failures = int(client.get(limits.failures_key(client_id, now)) or 0)
    if limit:
        limits.refuse_failures(failures + 1, limit, now)  # no SQL for a client past its limit
    entry = _lookup(session_factory, digest)
    if entry is None:
        _refuse(client, client_id, now, limit, remember=digest)
    # If a revocation (or new limits) wrote the entry since our SQL read, the script keeps
    # theirs and answers with it: a fill never replaces an entry.
    return _count(client, digest, now, entry, cache_seconds)


def _refuse(client: redis.Redis, client_id: str, now: float, limit: int, remember: str | None = None) -> NoReturn:
    """Count a failed authentication for the client and refuse it: 401, or 429 past its limit."""
    failures_key = limits.failures_key(client_id, now)
    pipe = client.pipeline(transaction=False)
    if remember:
        pipe.set(cache_key(remember), TOMBSTONE, nx=True, ex=UNKNOWN_KEY_CACHE_SECONDS)
    pipe.incr(failures_key)
    pipe.expire(failures_key, limits.MINUTE_COUNTER_TTL)
    failures = pipe.execute()[-2]
    if limit:
        limits.refuse_failures(failures, limit, now)
    raise AuthenticationFailed("Invalid API key.")


def _lookup(session_factory, digest: str) -> str | None:
    """The cache entry for the key from SQL: its fields, the tombstone when revoked, None when unknown."""
    row = session_factory().scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    return None if row is None else _entry(row)


def _entry(row: ApiKey) -> str:
    if row.revoked_at is not None:
        return TOMBSTONE
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
    cache_seconds: int = DEFAULT_CACHE_SECONDS,
) -> ApiKey:
    """Override a key's limits (None: the server default); effective at once.

    The new entry is written into the cache after the commit rather than the old one
    deleted: a request that read the row before the commit fills the cache only where
    there is no entry, so it cannot bring the old limits back (a delete would leave it
    the gap to). The write never replaces a revocation's tombstone. Two changes of the
    same key at the same moment may leave the earlier one cached for ``cache_seconds``.
    """
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"No API key {key_id}.", param="key_id")
    row.rate_per_minute, row.rate_per_day, row.spend_per_day_ucr = per_minute, per_day, spend_per_day_ucr
    session.commit()
    _script(client, "put", [cache_key(row.key_hash)], [_entry(row), min(cache_seconds, TOMBSTONE_SECONDS)])
    return row


def stamp_use(pipe, caller: Caller) -> None:
    """Queue a last-used stamp on a settle pipeline; ``flush_last_used`` moves stamps to SQL."""
    if caller.key_id:
        pipe.hset(LAST_USED, str(caller.key_id), str(int(time.time())))


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
