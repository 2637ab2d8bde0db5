"""Coinbase Commerce (USDC) webhooks, for operators who still have an account: the product is being retired.

Charges are created with metadata ``{"account_id", "credits_ucr"}``; ``charge:confirmed``
grants through the same once-only purchase path as Stripe (unique on the charge code),
but only when what was paid covers the price of those credits: the metadata says what
was ordered, never what was paid.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from decimal import Decimal, InvalidOperation

from sqlalchemy.orm import Session

from broker import billing, pricing
from broker.errors import InvalidRequest
from broker.ledger import Ledger

log = logging.getLogger(__name__)

# Coinbase prices a USD charge in USDC one to one (``pricing.settlement`` and each payment's
# ``value.crypto`` say "1.00 USD" = "1 USDC", PROVIDERS.md §9), so USDC counts as dollars.
DOLLARS = ("USD", "USDC")


def verify(body: bytes, signature: str | None, secret: str) -> None:
    """``X-CC-Webhook-Signature`` is the hex HMAC-SHA256 of the raw body; compared in constant time."""
    if not secret or not signature or not signature.isascii():
        raise InvalidRequest("Missing or unverifiable webhook signature.", code="bad_signature")
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.strip()):
        raise InvalidRequest("Webhook signature does not match.", code="bad_signature")


def handle_event(session: Session, ledger: Ledger, payload: dict, credit_usd: Decimal) -> str:
    """Apply one verified event; returns the outcome (recorded, logged and answered with a 200)."""
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
            outcome = _confirm(session, ledger, purchase, charge, credit_usd)
        elif kind == "charge:failed":
            billing.mark_failed(session, purchase)
            outcome = "failed"
        else:
            outcome = "pending"
    billing.remember_event(session, "coinbase", event_id, kind, outcome)
    return outcome


def _confirm(session: Session, ledger: Ledger, purchase, charge: dict, credit_usd: Decimal) -> str:
    """Grant the ordered credits when the confirmed payments cover their price; refuse (and fail) otherwise.

    An underpaid charge grants nothing rather than a part: the buyer ordered a pack, and
    an operator can settle the difference by hand (``flask broker grant``) after looking.
    """
    if purchase.status in ("paid", "partially_refunded", "refunded"):
        return purchase.status
    paid = paid_usd(charge)
    price = price_usd(purchase.credits_ucr, credit_usd)
    if paid is None or paid < price:
        reason = "unpriced currency" if paid is None else "underpaid"
        log.warning(
            "coinbase charge refused",
            extra={
                "charge": purchase.external_id,
                "reason": reason,
                "paid_usd": None if paid is None else str(paid),
                "price_usd": str(price),
                "credits_ucr": purchase.credits_ucr,
            },
        )
        billing.mark_failed(session, purchase)
        return f"refused: {reason}"
    billing.grant_purchase(session, ledger, purchase)
    return purchase.status


def price_usd(credits_ucr: int, credit_usd: Decimal) -> Decimal:
    """The dollar price of ``credits_ucr`` micro-credits, exact (no rounding in the buyer's favour)."""
    return Decimal(credits_ucr) * credit_usd / pricing.UCR_PER_CREDIT


def paid_usd(charge: dict) -> Decimal | None:
    """Dollars the charge's confirmed payments bring, or None when a payment is in no dollar currency.

    With a ``payments`` list (the Onchain Payment Protocol), only payments whose status is
    ``confirmed`` count, each by its ``value.local`` in USD or else its ``value.crypto`` in
    USDC. A confirmed charge without one is paid at its ``pricing.local`` (in USD) or its
    ``pricing.settlement`` (in USDC).
    """
    payments = charge.get("payments")
    if isinstance(payments, list) and payments:
        values = [p.get("value") or {} for p in payments if str(p.get("status", "")).lower() == "confirmed"]
        if not values:
            return Decimal(0)
        amounts = [_dollars(v.get("local"), v.get("crypto")) for v in values]
        return None if None in amounts else sum(amounts, Decimal(0))
    prices = charge.get("pricing") or {}
    return _dollars(prices.get("local"), prices.get("settlement"))


def _dollars(*money: object) -> Decimal | None:
    for item in money:
        if isinstance(item, dict) and str(item.get("currency", "")).upper() in DOLLARS:
            try:
                amount = Decimal(str(item.get("amount")))
            except InvalidOperation:
                return None
            return amount if amount.is_finite() and amount >= 0 else None
    return None


def _purchase(session: Session, charge: dict):
    metadata = charge.get("metadata") or {}
    try:
        account_id = int(metadata["account_id"])
        credits_ucr = int(metadata["credits_ucr"])
    except (KeyError, TypeError, ValueError):
        return None
    if not 0 < credits_ucr < 2**62:  # what the ledger's BIGINT holds
        return None
    price = (charge.get("pricing") or {}).get("local") or {}
    try:
        amount = Decimal(str(price.get("amount")))
        cents = int(amount * 100) if amount.is_finite() and 0 <= amount < 10**9 else 0
    except InvalidOperation:
        cents = 0
    return billing.record_purchase(
        session,
        account_id=account_id,
        provider="coinbase",
        external_id=charge["code"],
        amount_cents=cents,
        credits_ucr=credits_ucr,
        method="crypto",
        currency=str(price.get("currency") or "usd").lower()[:8],
    )
