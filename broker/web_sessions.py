"""Server-side web sessions: the cookie names a random session id that lives in Redis.

Log-out deletes the id, so a copied cookie stops working at once; "log out everywhere"
and password changes bump the account's ``session_generation`` (checked on every
request), which ends every session issued before. Only a digest of the id is stored.
"""

from __future__ import annotations

import hashlib
import secrets

import redis

PREFIX = "websession:"
LIFETIME_SECONDS = 7 * 24 * 3600  # a session ends a week after log-in, however it is used


def _key(session_id: str) -> str:
    return PREFIX + hashlib.sha256(session_id.encode()).hexdigest()


def start(client: redis.Redis, account_id: int) -> str:
    """A new session id for the account; only its digest is kept."""
    session_id = secrets.token_urlsafe(32)
    client.set(_key(session_id), str(account_id), ex=LIFETIME_SECONDS)
    return session_id


def alive(client: redis.Redis, session_id: str, account_id: int) -> bool:
    return bool(session_id) and client.get(_key(session_id)) == str(account_id)


def end(client: redis.Redis, session_id: str) -> None:
    if session_id:
        client.delete(_key(session_id))
