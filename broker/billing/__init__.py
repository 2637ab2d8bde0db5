"""Money in: purchases (Stripe Checkout, Coinbase Commerce), their one-time grants, refunds and webhooks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from broker import pricing
from broker.errors import InvalidRequest, NotFound
from broker.ledger import Ledger, purchase_ref
from broker.models import Purchase, WebhookEvent

log = logging.getLogger(__name__)

# How a purchase ends unpaid: the payment failed, the buyer left Checkout, or the session lapsed.
UNPAID_ENDINGS = ("failed", "canceled", "expired")


@dataclass(frozen=True)
class Pack:
    id: str
    usd: Decimal


@dataclass
class Catalogue:
    """What can be bought, and how many credits a dollar buys."""

    packs: list[Pack]
    min_usd: Decimal
    max_usd: Decimal
    credit_usd: Decimal

    @classmethod
    def from_config(cls, config: dict) -> Catalogue:
        amounts = [Decimal(x) for x in str(config["CREDIT_PACKS_USD"]).split(",") if x.strip()]
        packs = [Pack(f"usd{format(a.normalize(), 'f')}", a) for a in amounts]
        return cls(packs, config["CHECKOUT_MIN_USD"], config["CHECKOUT_MAX_USD"], config["CREDIT_USD"])

    def credits_ucr(self, usd: Decimal) -> int:
        return pricing.credits_to_ucr((usd / self.credit_usd).quantize(Decimal("0.000001")))

    def choose(self, pack: str | None, amount_usd: Decimal | None) -> tuple[str | None, Decimal]:
        """The pack id (None for a custom amount) and its price; a 400 naming the param otherwise."""
        if pack is not None:
            found = next((p for p in self.packs if p.id == pack), None)
            if found is None:
                raise InvalidRequest(
                    f"Unknown pack '{pack}'. Packs: {', '.join(p.id for p in self.packs)}.", param="pack"
                )
            return found.id, found.usd
        if amount_usd is None:
            raise InvalidRequest("Give a 'pack' or an 'amount_usd'.", param="pack")
        if not self.min_usd <= amount_usd <= self.max_usd or amount_usd != amount_usd.quantize(Decimal("0.01")):
            raise InvalidRequest(
                f"amount_usd must be between {self.min_usd} and {self.max_usd}, in whole cents.", param="amount_usd"
            )
        return None, amount_usd


def record_purchase(
    session: Session,
    *,
    account_id: int,
    provider: str,
    external_id: str,
    amount_cents: int,
    credits_ucr: int,
    pack: str | None = None,
    method: str = "card",
    currency: str = "usd",
    payment_intent: str | None = None,
) -> Purchase:
    """The purchase for (provider, external_id), created pending if new; safe under concurrency."""
    found = session.scalar(select(Purchase).where(Purchase.provider == provider, Purchase.external_id == external_id))
    if found is not None:
        if payment_intent and not found.payment_intent:
            found.payment_intent = payment_intent
            session.commit()
        return found
    purchase = Purchase(
        account_id=account_id,
        provider=provider,
        external_id=external_id,
        amount_cents=amount_cents,
        credits_ucr=credits_ucr,
        pack=pack,
        method=method,
        currency=currency,
        payment_intent=payment_intent,
    )
    session.add(purchase)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return session.scalar(
            select(Purchase).where(Purchase.provider == provider, Purchase.external_id == external_id)
        )
    return purchase


def grant_purchase(session: Session, ledger: Ledger, purchase: Purchase) -> bool:
    """Mark the purchase paid and grant its credits, exactly once however often it is called.

    The grant is unique by the purchase's provider and external id in the ledger, so
    concurrent calls (webhook retries, the success page) add the credits once.
    Returns True when the purchase is paid afterwards.
    """
    ledger.grant(
        session,
        purchase.account_id,
        purchase.credits_ucr,
        f"{purchase.provider}-{purchase.external_id}",
        f"{purchase.provider} purchase {purchase.id}",
    )
    # A payment the provider confirms wins over any unpaid ending we recorded before.
    session.execute(
        update(Purchase)
        .where(Purchase.id == purchase.id, Purchase.status.in_(("pending", *UNPAID_ENDINGS)))
        .values(status="paid", paid_at=datetime.now(UTC))
    )
    session.commit()
    session.refresh(purchase)
    return purchase.status != "pending"


def mark_failed(session: Session, purchase: Purchase) -> None:
    end_unpaid(session, purchase, "failed")


def end_unpaid(session: Session, purchase: Purchase, status: str) -> bool:
    """A pending purchase ends without payment (``UNPAID_ENDINGS``); True if it was pending.

    A purchase that is no longer pending (paid, or ended already) is left as it is.
    """
    if status not in UNPAID_ENDINGS:
        raise ValueError(f"not an unpaid ending: {status}")
    changed = session.execute(
        update(Purchase).where(Purchase.id == purchase.id, Purchase.status == "pending").values(status=status)
    )
    session.commit()
    session.refresh(purchase)
    return bool(changed.rowcount)


def set_receipt(session: Session, purchase: Purchase, receipt_url: str | None) -> None:
    """Keep the provider's receipt link of a paid purchase (shown on the billing page)."""
    if receipt_url and purchase.receipt_url != receipt_url:
        purchase.receipt_url = receipt_url[:500]
        session.commit()


def take_back(session: Session, ledger: Ledger, purchase: Purchase, refunded_cents: int, refund_id: str) -> int:
    """Take back the credits of a refund (cumulative ``refunded_cents``), never below zero.

    The debit is unique by ``refund_id`` in the ledger. What the balance lacks is owed
    from the account's open holds as they end (the credits they give back); credits already
    spent are the purchase's shortfall. Returns the micro-credits taken at once.

    Refund events for one purchase run one at a time (a Redis lock per purchase), each on the
    purchase as the one before left it: concurrent cumulative events (300, 700, 500 cents)
    take back 700 cents' worth, never the sum of their separate deltas. A crash between the
    debit and the row update is safe: the retried event replays the same debit id.
    """
    with ledger.redis.lock(f"refund-lock:{purchase.id}", timeout=60, blocking_timeout=60):
        session.commit()  # end any transaction that read the purchase before the lock was held
        session.refresh(purchase)
        return _take_back(session, ledger, purchase, refunded_cents, refund_id)


def _take_back(session: Session, ledger: Ledger, purchase: Purchase, refunded_cents: int, refund_id: str) -> int:
    refunded_cents = min(refunded_cents, purchase.amount_cents)
    new_cents = refunded_cents - purchase.refunded_cents
    if new_cents <= 0 or purchase.status not in ("paid", "partially_refunded"):
        return 0
    # Cumulative, so the deltas of partial refunds add up to exactly the credits at a full one.
    wanted = purchase.credits_for(refunded_cents) - purchase.credits_for(purchase.refunded_cents)
    applied, taken, _ = ledger.debit(
        session,
        purchase.account_id,
        wanted,
        refund_id,
        f"refund of purchase {purchase.id}",
        ref=purchase_ref(purchase.id),
    )
    # The debit's drain booked on the purchase what it took and what was already spent
    # (refunded_ucr, shortfall_ucr); what open holds still owe is booked as they end.
    changed = session.execute(
        update(Purchase)
        .where(Purchase.id == purchase.id, Purchase.refunded_cents == purchase.refunded_cents)
        .values(
            refunded_cents=refunded_cents,
            status="refunded" if refunded_cents == purchase.amount_cents else "partially_refunded",
        )
    )
    session.commit()
    session.refresh(purchase)
    if changed.rowcount and wanted > taken:
        log.warning(
            "refund not taken at once",
            extra={"purchase_id": purchase.id, "owed_or_spent_ucr": wanted - taken, "applied": applied},
        )
    return taken if changed.rowcount else 0


def seen_event(session: Session, provider: str, event_id: str) -> bool:
    return (
        session.scalar(
            select(WebhookEvent.id).where(WebhookEvent.provider == provider, WebhookEvent.event_id == event_id)
        )
        is not None
    )


def remember_event(session: Session, provider: str, event_id: str, kind: str, outcome: str) -> None:
    session.add(WebhookEvent(provider=provider, event_id=event_id, type=kind[:80], outcome=outcome[:40]))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()


def purchases_of(session: Session, account_id: int, limit: int = 100) -> list[Purchase]:
    return list(
        session.scalars(
            select(Purchase).where(Purchase.account_id == account_id).order_by(Purchase.id.desc()).limit(limit)
        )
    )


def pending_of(session: Session, account_id: int, provider: str, limit: int = 10) -> list[Purchase]:
    """The account's newest pending purchases with one provider (checkouts not yet paid or ended)."""
    return list(
        session.scalars(
            select(Purchase)
            .where(Purchase.account_id == account_id, Purchase.provider == provider, Purchase.status == "pending")
            .order_by(Purchase.id.desc())
            .limit(limit)
        )
    )


def get_purchase(session: Session, purchase_id: int) -> Purchase:
    purchase = session.get(Purchase, purchase_id)
    if purchase is None:
        raise NotFound(f"No purchase {purchase_id}.", param="purchase_id")
    return purchase


def purchase_json(purchase: Purchase) -> dict:
    return {
        "id": purchase.id,
        "object": "purchase",
        "provider": purchase.provider,
        "external_id": purchase.external_id,
        "method": purchase.method,
        "pack": purchase.pack,
        "amount_usd": format(Decimal(purchase.amount_cents) / 100, "f"),
        "credits": pricing.format_credits(purchase.credits_ucr),
        "status": purchase.status,
        "refunded_credits": pricing.format_credits(purchase.refunded_ucr),
        "created_at": _iso(purchase.created_at),
        "paid_at": _iso(purchase.paid_at),
        "receipt_url": purchase.receipt_url,
    }


def _iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()
