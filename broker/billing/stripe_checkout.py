"""Stripe Checkout: create top-up sessions, fulfil or cancel them from Stripe's own record, handle webhook events."""

from __future__ import annotations

import logging
import secrets
from decimal import Decimal

import stripe
from sqlalchemy import select
from sqlalchemy.orm import Session

from broker import billing
from broker.billing import Catalogue
from broker.errors import InvalidRequest, ServiceUnavailable
from broker.ledger import Ledger
from broker.models import Purchase

log = logging.getLogger(__name__)


def make_client(config: dict) -> stripe.StripeClient | None:
    if not config["STRIPE_SECRET_KEY"]:
        return None
    return stripe.StripeClient(
        config["STRIPE_SECRET_KEY"], base_addresses={"api": config["STRIPE_API_BASE"]}, max_network_retries=2
    )


def create_checkout(
    client: stripe.StripeClient | None,
    session: Session,
    catalogue: Catalogue,
    account_id: int,
    pack: str | None,
    amount_usd: Decimal | None,
    crypto: bool,
    crypto_enabled: bool,
    return_url: str,
) -> tuple[Purchase, str]:
    """A Checkout Session (mode=payment) for a pack or a custom amount, recorded as a pending purchase.

    Returns the purchase and the Checkout URL to send the buyer to.
    """
    if client is None:
        raise ServiceUnavailable("Card payments are not configured on this server.", code="payments_unavailable")
    if crypto and not crypto_enabled:
        raise InvalidRequest("Stablecoin payments are not enabled on this server.", param="crypto")
    pack_id, usd = catalogue.choose(pack, amount_usd)
    credits_ucr = catalogue.credits_ucr(usd)
    cents = int(usd * 100)
    # Names this checkout in its cancel URL (Stripe fills in the session id only on success),
    # and only the buyer who was sent there knows it.
    ref = secrets.token_urlsafe(16)
    params = {
        "mode": "payment",
        "line_items": [
            {
                "price_data": {
                    "currency": "usd",
                    "unit_amount": cents,
                    "product_data": {"name": f"{credits_ucr // 1_000_000:,} API credits"},
                },
                "quantity": 1,
            }
        ],
        "client_reference_id": str(account_id),
        "metadata": {
            "account_id": str(account_id),
            "credits_ucr": str(credits_ucr),
            "pack": pack_id or "custom",
            "checkout_ref": ref,
        },
        "success_url": return_url + "?session_id={CHECKOUT_SESSION_ID}",
        "cancel_url": return_url + "?canceled=" + ref,
    }
    if crypto:
        params["payment_method_types"] = ["card", "crypto"]
    try:
        checkout = client.v1.checkout.sessions.create(params=params).to_dict()
    except stripe.StripeError as error:
        log.error("stripe checkout failed", extra={"error": type(error).__name__})
        raise ServiceUnavailable("The payment provider is unavailable; try again shortly.") from None
    purchase = billing.record_purchase(
        session,
        account_id=account_id,
        provider="stripe",
        external_id=checkout["id"],
        amount_cents=cents,
        credits_ucr=credits_ucr,
        pack=pack_id,
        method="crypto" if crypto else "card",
        payment_intent=checkout.get("payment_intent"),
    )
    return purchase, checkout["url"]


def fulfil_checkout(client: stripe.StripeClient, session: Session, ledger: Ledger, session_id: str) -> Purchase | None:
    """Grant a Checkout Session's credits once it is paid; idempotent, safe to call concurrently.

    The session is read back from Stripe's API (never trusted from the caller), and
    only our own metadata on it says which account and how many credits. A paid
    purchase keeps its charge's ``receipt_url`` (the PaymentIntent's latest charge).
    """
    checkout = _read(client, session_id)
    return None if checkout is None else _fulfil(session, ledger, checkout)


def cancel_checkout(
    client: stripe.StripeClient, session: Session, ledger: Ledger, account_id: int, ref: str
) -> Purchase | None:
    """The buyer came back by the cancel link of checkout ``ref``: end it at Stripe, then here.

    The purchase is marked ``canceled`` only once Stripe has expired the session, so that
    it can no longer be paid; a session that is complete by then is fulfilled instead (a
    payment always wins). Returns the purchase, whose status says what happened, or None
    when no pending checkout of this account has that ref.
    """
    for purchase in billing.pending_of(session, account_id, "stripe"):
        checkout = _read(client, purchase.external_id)
        if checkout is None or (checkout.get("metadata") or {}).get("checkout_ref") != ref:
            continue
        if checkout.get("status") == "open":
            try:
                client.v1.checkout.sessions.expire(checkout["id"])
            except stripe.InvalidRequestError:
                # No longer open: paid (or lapsed) in the meantime. Go by what Stripe has now.
                checkout = _read(client, purchase.external_id) or checkout
            except stripe.StripeError as error:
                log.error("stripe expire failed", extra={"error": type(error).__name__})
                raise ServiceUnavailable("The payment provider is unavailable; try again shortly.") from None
            else:
                billing.end_unpaid(session, purchase, "canceled")
                return purchase
        if checkout.get("status") == "expired":
            billing.end_unpaid(session, purchase, "expired")
            return purchase
        return _fulfil(session, ledger, checkout) or purchase
    return None


def _read(client: stripe.StripeClient, session_id: str) -> dict | None:
    """The Checkout Session as Stripe has it, with its PaymentIntent and that one's latest charge."""
    try:
        return client.v1.checkout.sessions.retrieve(
            session_id, params={"expand": ["payment_intent.latest_charge"]}
        ).to_dict()
    except stripe.InvalidRequestError as error:
        # Stripe does not know the session on our account (another account's, or made up):
        # nothing to fulfil, and nothing for Stripe to retry.
        log.warning("checkout session not found", extra={"session_id": session_id[:100], "code": error.code})
        return None
    except stripe.StripeError as error:
        log.error("stripe retrieve failed", extra={"error": type(error).__name__})
        raise ServiceUnavailable("The payment provider is unavailable; try again shortly.") from None


def _fulfil(session: Session, ledger: Ledger, checkout: dict) -> Purchase | None:
    metadata = checkout.get("metadata") or {}
    if "account_id" not in metadata or "credits_ucr" not in metadata:
        log.warning("checkout session without broker metadata", extra={"session_id": checkout["id"]})
        return None
    intent = checkout.get("payment_intent")
    charge = intent.get("latest_charge") if isinstance(intent, dict) else None
    purchase = billing.record_purchase(
        session,
        account_id=int(metadata["account_id"]),
        provider="stripe",
        external_id=checkout["id"],
        amount_cents=int(checkout.get("amount_total") or 0),
        credits_ucr=int(metadata["credits_ucr"]),
        pack=metadata.get("pack"),
        payment_intent=intent.get("id") if isinstance(intent, dict) else intent,
    )
    if checkout.get("payment_status") == "paid":
        billing.grant_purchase(session, ledger, purchase)
        billing.set_receipt(session, purchase, charge.get("receipt_url") if isinstance(charge, dict) else None)
    return purchase


def handle_event(client: stripe.StripeClient, session: Session, ledger: Ledger, event: dict) -> str:
    """Apply one verified webhook event; returns what was done (for the log and the reply)."""
    if billing.seen_event(session, "stripe", event["id"]):
        return "duplicate"
    kind = event["type"]
    obj = event["data"]["object"]
    if kind.startswith(("checkout.session.", "charge.")) and not isinstance(obj.get("id"), str):
        outcome = "not ours"
    elif kind in ("checkout.session.completed", "checkout.session.async_payment_succeeded"):
        purchase = fulfil_checkout(client, session, ledger, obj["id"])
        outcome = purchase.status if purchase else "not ours"
    elif kind in ("checkout.session.async_payment_failed", "checkout.session.expired"):
        purchase = session.scalar(
            select(Purchase).where(Purchase.provider == "stripe", Purchase.external_id == obj["id"])
        )
        ending = "failed" if kind.endswith("failed") else "expired"
        if purchase is not None:
            billing.end_unpaid(session, purchase, ending)
        outcome = ending
    elif kind == "charge.refunded":
        outcome = _refund(session, ledger, obj)
    else:
        outcome = "ignored"
    billing.remember_event(session, "stripe", event["id"], kind, outcome)
    return outcome


def _refund(session: Session, ledger: Ledger, charge: dict) -> str:
    purchase = session.scalar(
        select(Purchase).where(Purchase.provider == "stripe", Purchase.payment_intent == charge.get("payment_intent"))
    )
    if purchase is None:
        return "not ours"
    refunded = int(charge.get("amount_refunded") or 0)
    taken = billing.take_back(session, ledger, purchase, refunded, f"stripe-refund-{charge['id']}-{refunded}")
    return f"refunded {taken}"
