"""Top-ups from the API: create a Stripe Checkout Session, list your purchases."""

from __future__ import annotations

from flask import current_app, g, jsonify

from broker import billing
from broker.api import bp, parse
from broker.api.openapi import operation
from broker.billing import stripe_checkout
from broker.errors import Forbidden
from broker.extensions import services
from broker.hosts import return_url
from broker.schemas import CheckoutRequest, CheckoutSession, PurchaseList


@bp.post("/checkout")
@operation(
    summary="Create a Checkout Session to buy credits",
    description="Give a `pack` id or an `amount_usd`; send the buyer (or yourself) to `url`. Credits arrive when "
    "Stripe reports the payment; `crypto: true` also offers USDC where the server enables it.",
    tag="Billing",
    body=CheckoutRequest,
    response=CheckoutSession,
    errors=("400", "401", "429", "503"),
)
def create_checkout():
    svc = services()
    if g.caller.marketplace:
        raise Forbidden("Marketplace subscribers are billed by RapidAPI.", code="billed_by_marketplace")
    req = parse(CheckoutRequest)
    purchase, url = stripe_checkout.create_checkout(
        svc.stripe,
        svc.db(),
        svc.catalogue,
        g.caller.account_id,
        req.pack,
        req.amount_usd,
        req.crypto,
        current_app.config["STRIPE_CRYPTO"],
        return_url(),
    )
    return jsonify({"id": purchase.external_id, "object": "checkout.session", "url": url, "purchase_id": purchase.id})


@bp.get("/purchases")
@operation(summary="Your purchases, newest first", tag="Billing", response=PurchaseList, errors=("401", "429", "503"))
def list_purchases():
    rows = billing.purchases_of(services().db(), g.caller.account_id)
    return jsonify({"object": "list", "data": [billing.purchase_json(p) for p in rows]})
