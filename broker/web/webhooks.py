"""Payment webhooks: Stripe (signed with Stripe-Signature) and Coinbase Commerce (X-CC-Webhook-Signature)."""

from __future__ import annotations

import json
import logging

import stripe
from flask import Blueprint, current_app, jsonify, request

from broker.billing import coinbase, stripe_checkout
from broker.errors import InvalidRequest, ServiceUnavailable
from broker.extensions import services
from broker.openapi import operation
from broker.schemas import WebhookReceived

bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")
log = logging.getLogger(__name__)
TOLERANCE_SECONDS = 300


@bp.post("/stripe")
@operation(
    summary="Stripe events (Checkout completed, async payments, expired; refunds)",
    tag="Webhooks",
    auth=False,
    response=WebhookReceived,
)
def stripe_webhook():
    svc = services()
    secret = current_app.config["STRIPE_WEBHOOK_SECRET"]
    if not secret or svc.stripe is None:
        raise ServiceUnavailable("Stripe is not configured on this server.", code="payments_unavailable")
    payload = request.get_data()
    if not request.headers.get("Stripe-Signature", "").isascii():
        raise InvalidRequest("Webhook signature does not verify.", code="bad_signature")
    try:
        event = stripe.Webhook.construct_event(
            payload, request.headers.get("Stripe-Signature", ""), secret, tolerance=TOLERANCE_SECONDS
        )
    except (stripe.SignatureVerificationError, ValueError):
        raise InvalidRequest("Webhook signature does not verify.", code="bad_signature") from None
    outcome = stripe_checkout.handle_event(svc.stripe, svc.db(), svc.ledger, event.to_dict())
    log.info("stripe event", extra={"event_id": event.id, "type": event.type, "outcome": outcome})
    return jsonify({"received": True, "outcome": outcome})


@bp.post("/coinbase")
@operation(
    summary="Coinbase Commerce charge events (USDC; product being retired)",
    tag="Webhooks",
    auth=False,
    response=WebhookReceived,
)
def coinbase_webhook():
    payload = request.get_data()
    coinbase.verify(
        payload, request.headers.get("X-CC-Webhook-Signature"), current_app.config["COINBASE_WEBHOOK_SECRET"]
    )
    try:
        body = json.loads(payload)
    except ValueError:
        raise InvalidRequest("The body is not JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Not a Coinbase Commerce event.", code="invalid_event")
    svc = services()
    outcome = coinbase.handle_event(svc.db(), svc.ledger, body, svc.catalogue.credit_usd)
    log.info("coinbase event", extra={"outcome": outcome})
    return jsonify({"received": True, "outcome": outcome})
