"""Dashboard: credit packs, Stripe Checkout and the return from it, purchases."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from flask import abort, current_app, flash, make_response, redirect, request, url_for

from broker import billing as billing_domain
from broker import pricing
from broker.billing import stripe_checkout
from broker.errors import BrokerError
from broker.extensions import services
from broker.hosts import return_url
from broker.web.auth import verified_required
from broker.web.dashboard import account_id, bp, is_partial, render


def _billing_context() -> dict:
    svc = services()
    catalogue = svc.catalogue
    return {
        "purchases": [billing_domain.purchase_json(p) for p in billing_domain.purchases_of(svc.db(), account_id())],
        "packs": [
            {"id": p.id, "usd": p.usd, "credits": pricing.format_credits(catalogue.credits_ucr(p.usd))}
            for p in catalogue.packs
        ],
        "min_usd": catalogue.min_usd,
        "max_usd": catalogue.max_usd,
        "payments": svc.stripe is not None,
        "crypto": current_app.config["STRIPE_CRYPTO"],
    }


@bp.get("/billing")
def billing():
    return render("dashboard/billing.html", "dashboard/_billing.html", **_billing_context())


@bp.post("/billing/checkout")
@verified_required
def checkout():
    """Start a Stripe Checkout for a pack or a custom amount, and send the browser there."""
    svc = services()
    amount = request.form.get("amount_usd") or None
    try:
        _, url = stripe_checkout.create_checkout(
            svc.stripe,
            svc.db(),
            svc.catalogue,
            account_id(),
            request.form.get("pack") or None,
            Decimal(amount) if amount else None,
            request.form.get("crypto") == "1",
            current_app.config["STRIPE_CRYPTO"],
            return_url(),
        )
    except (BrokerError, InvalidOperation) as error:
        flash(getattr(error, "message", "Enter an amount in dollars."), "error")
        return redirect(url_for("dashboard.billing"))
    if is_partial():
        response = make_response("", 204)
        response.headers["HX-Redirect"] = url
        return response
    return redirect(url, code=303)


@bp.get("/billing/return")
def checkout_return():
    """Where Stripe sends the buyer back: fulfil at once (the webhook may come later, or never)."""
    svc = services()
    session_id = request.args.get("session_id")
    if request.args.get("canceled"):
        flash("Checkout canceled; nothing was charged.", "info")
    elif session_id and svc.stripe is not None:
        purchase = stripe_checkout.fulfil_checkout(svc.stripe, svc.db(), svc.ledger, session_id)
        if purchase is None or purchase.account_id != account_id():
            abort(404)
        if purchase.status == "paid":
            flash(f"Payment received: {pricing.format_credits(purchase.credits_ucr)} credits added.", "info")
        else:
            flash("Payment is processing; the credits appear here as soon as it settles.", "info")
    response = redirect(url_for("dashboard.billing"))
    response.headers["HX-Trigger"] = "balance-changed"
    return response
