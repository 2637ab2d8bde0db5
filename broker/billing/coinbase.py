"""Coinbase Commerce (USDC) webhooks, for operators who still have an account: the product is being retired.

Charges are created with metadata ``{"account_id", "credits_ucr"}``; ``charge:confirmed``
grants through the same once-only purchase path as Stripe (unique on the charge code).
"""

from __future__ import annotations

import hashlib
import hmac
from decimal import Decimal, InvalidOperation

from sqlalchemy.orm import Session

from broker import billing
from broker.errors import InvalidRequest
from broker.ledger import Ledger


def verify(body: bytes, signature: str | None, secret: str) -> None:
    """``X-CC-Webhook-Signature`` is the hex HMAC-SHA256 of the raw body; compared in constant time."""
    if not secret or not signature or not signature.isascii():
        raise InvalidRequest("Missing or unverifiable webhook signature.", code="bad_signature")
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.strip()):
        raise InvalidRequest("Webhook signature does not match.", code="bad_signature")


def handle_event(session: Session, ledger: Ledger, payload: dict) -> str:
    event = payload.get("event") or {}
    event_id, kind = event.get("id"), event.get("type", "")
    charge = event.get("data") or {}
    if not event_id or not charge.get("code"):
        raise InvalidRequest("Not a Coinbase Commerce event.", code="invalid_event")
    if billing.seen_event(session, "coinbase", event_id):
        return "duplicate"
    outcome = "ignored"
    if kind in ("charge:pending", "charge:confirmed", "charge:failed"):
        purchase = _purchase(session, charge)
        if purchase is None:
            outcome = "not ours"
        elif kind == "charge:confirmed":
            billing.grant_purchase(session, ledger, purchase)
            outcome = purchase.status
        elif kind == "charge:failed":
            billing.mark_failed(session, purchase)
            outcome = "failed"
        else:
            outcome = "pending"
    billing.remember_event(session, "coinbase", event_id, kind, outcome)
    return outcome


def _purchase(session: Session, charge: dict):
    metadata = charge.get("metadata") or {}
    try:
        account_id = int(metadata["account_id"])
        credits_ucr = int(metadata["credits_ucr"])
        usd = Decimal(charge["pricing"]["local"]["amount"])
    except (KeyError, TypeError, ValueError, InvalidOperation):
        return None
    return billing.record_purchase(
        session,
        account_id=account_id,
        provider="coinbase",
        external_id=charge["code"],
        amount_cents=int(usd * 100),
        credits_ucr=credits_ucr,
        method="crypto",
    )
