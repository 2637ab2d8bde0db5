"""Dashboard: the balance, credit packs, Stripe Checkout and the return from it (paid or canceled), purchases."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from flask import Response, abort, current_app, flash, make_response, redirect, request, url_for

from broker import billing as billing_domain
from broker import pricing
from broker.billing import stripe_checkout
from broker.errors import BrokerError
from broker.extensions import services
from broker.hosts import return_url
from broker.models import Purchase
from broker.web.auth import verified_required
from broker.web.dashboard import account_id, bp, is_partial, render


def _billing_context() -> dict:
    svc = services()
    catalogue = svc.catalogue
    balance = svc.ledger.snapshot(account_id())["balance"]
    return {
        "balance": pricing.format_credits(balance),
        "balance_usd": f"{Decimal(balance) / 1_000_000 * catalogue.credit_usd:,.2f}",
        "purchases": [
            {**billing_domain.purchase_json(p), "credits_shown": _whole(p.credits_ucr)}
            for p in billing_domain.purchases_of(svc.db(), account_id())
        ],
        "packs": [{"id": p.id, "usd": p.usd, "credits": _whole(catalogue.credits_ucr(p.usd))} for p in catalogue.packs],
        "min_usd": catalogue.min_usd,
        "max_usd": catalogue.max_usd,
        "payments": svc.stripe is not None,
        "crypto": current_app.config["STRIPE_CRYPTO"],
    }


def _whole(ucr: int) -> str:
    """Credits as a reader counts them in a list: 2,000 rather than 2000.000000 (full precision if not whole)."""
    return f"{ucr // 1_000_000:,}" if ucr % 1_000_000 == 0 else pricing.format_credits(ucr)


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
        message = getattr(error, "message", "Enter an amount in dollars.")
        if is_partial():
            # htmx swaps a 422 in: the billing card again, with the reason beside the forms.
            return _partial(422, error=message)
        flash(message, "error")
        return redirect(url_for("dashboard.billing"))
    if is_partial():
        response = make_response("", 204)
        response.headers["HX-Redirect"] = url
        return response
    return redirect(url, code=303)


def _partial(status: int, **extra) -> Response:
    response = render("dashboard/billing.html", "dashboard/_billing.html", **_billing_context(), **extra)
    response.status_code = status
    return response


@bp.get("/billing/return")
def checkout_return():
    """Where Stripe sends the buyer back: fulfil at once (the webhook may come later, or never).

    Back by the cancel link, the checkout is expired at Stripe first, and marked canceled
    only if that worked: a session paid in the meantime is fulfilled instead.
    """
    svc = services()
    session_id = request.args.get("session_id")
    ref = request.args.get("canceled")
    if ref and svc.stripe is not None:
        try:
            purchase = stripe_checkout.cancel_checkout(svc.stripe, svc.db(), svc.ledger, account_id(), ref[:100])
        except BrokerError:
            purchase = None
            flash("Stripe could not be reached to close that checkout; unpaid, it lapses within a day.", "error")
        else:
            _flash_outcome(purchase)
    elif session_id and svc.stripe is not None:
        purchase = stripe_checkout.fulfil_checkout(svc.stripe, svc.db(), svc.ledger, session_id)
        if purchase is None or purchase.account_id != account_id():
            abort(404)
        _flash_outcome(purchase)
    response = redirect(url_for("dashboard.billing"))
    response.headers["HX-Trigger"] = "balance-changed"
    return response


def _flash_outcome(purchase: Purchase | None) -> None:
    if purchase is None or purchase.status in ("canceled", "expired"):
        flash("Checkout canceled; nothing was charged.", "info")
    elif purchase.status == "pending":
        flash("Payment is processing; the credits appear here as soon as it settles.", "info")
    else:
        flash(f"Payment received: {_whole(purchase.credits_ucr)} credits added.", "info")
