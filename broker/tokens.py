"""Emailed links: signed, expiring tokens bound to the account state they change, so each works once.

A password link carries a keyed digest of the account's current password hash (never the
hash itself): setting a password changes the hash, so the link that did it, and every
other link sent before, is refused afterwards. A verification link names the address it
was sent to and works only while that address is unverified.
"""

from __future__ import annotations

import hashlib
import hmac

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy.orm import Session

from broker.errors import InvalidRequest
from broker.models import Account

PASSWORD = "password"
VERIFY = "verify"
MAX_AGE = {PASSWORD: 3600, VERIFY: 48 * 3600}


def _serializer(secret: str, purpose: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(secret, salt=f"broker-{purpose}-link")


def _state(secret: str, account: Account, purpose: str) -> str:
    """What the link is bound to: a keyed digest of the password hash, or the unverified address."""
    if purpose == PASSWORD:
        bound = f"{account.id}:{account.password_hash or ''}"
    else:
        bound = f"{account.id}:{account.email}:{'verified' if account.email_verified_at else 'unverified'}"
    return hmac.new(secret.encode(), bound.encode(), hashlib.sha256).hexdigest()[:32]


def make(secret: str, purpose: str, account: Account) -> str:
    return _serializer(secret, purpose).dumps({"a": account.id, "s": _state(secret, account, purpose)})


def redeem(secret: str, purpose: str, token: str, session: Session) -> Account:
    """The account a still-valid link is for; ``InvalidRequest`` for an old, used, altered or foreign link."""
    try:
        data = _serializer(secret, purpose).loads(token, max_age=MAX_AGE[purpose])
    except SignatureExpired:
        raise InvalidRequest("This link has expired. Ask for a new one.", code="link_expired") from None
    except BadSignature:
        raise InvalidRequest("This link is not valid.", code="link_invalid") from None
    account = session.get(Account, data.get("a")) if isinstance(data, dict) else None
    if account is None or not hmac.compare_digest(str(data.get("s")), _state(secret, account, purpose)):
        raise InvalidRequest("This link was already used or is no longer valid.", code="link_used")
    return account
