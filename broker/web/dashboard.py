"""The HTMX dashboard: balance, keys, usage (charts, table, CSV), jobs and billing; every page also works whole."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from flask_login import current_user, login_required
from sqlalchemy import select

from broker import billing as billing_domain
from broker import charts, keys, media, pricing, usage
from broker.billing import stripe_checkout
from broker.errors import BrokerError, NotFound
from broker.extensions import services
from broker.hosts import return_url
from broker.models import Account, ApiKey, Job, UsageRecord
from broker.web.auth import verified_required

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard")
PAGE = 20


@bp.before_request
@login_required
def _require_login() -> None:
    """Every dashboard route needs a logged-in account."""


@bp.after_request
def _no_store(response: Response) -> Response:
    """Balances, keys (a new key above all) and receipts are never cached, nor replayed from history."""
    response.headers["Cache-Control"] = "no-store"
    return response


def is_partial() -> bool:
    """An HTMX request for a fragment: not a full load, and not a history restore."""
    return bool(request.headers.get("HX-Request")) and not request.headers.get("HX-History-Restore-Request")


def render(full: str, partial: str, **context) -> Response:
    """The partial alone for HTMX, the whole page otherwise; both vary on HX-Request."""
    response = make_response(render_template(partial if is_partial() else full, **context))
    response.headers["Vary"] = "HX-Request"
    return response


def _account_id() -> int:
    return current_user.account_id


def _fresh_usage() -> None:
    """Copy this account's pending ledger entries and roll up today, so what it sees is current."""
    svc = services()
    svc.ledger.drain(svc.db(), [_account_id()])
    usage.rollup_days(svc.db(), days=1, account_id=_account_id())


# -- overview and balance -----------------------------------------------------------


def _balance_context() -> dict:
    svc = services()
    snap = svc.ledger.snapshot(_account_id())
    now = datetime.now(UTC)
    session = svc.db()
    return {
        "available": pricing.format_credits(snap["balance"]),
        "held": pricing.format_credits(snap["holds_sum"]),
        "today": pricing.format_credits(
            usage.spent_since(session, _account_id(), now.replace(hour=0, minute=0, second=0, microsecond=0))
        ),
        "month": pricing.format_credits(
            usage.spent_since(session, _account_id(), now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
        ),
    }


@bp.get("/")
def overview():
    _fresh_usage()
    recent = usage.list_usage(services().db(), _account_id(), limit=5)["data"]
    return render("dashboard/overview.html", "dashboard/_balance.html", recent=recent, **_balance_context())


@bp.get("/balance")
def balance():
    return render("dashboard/overview.html", "dashboard/_balance.html", recent=[], **_balance_context())


# -- keys -------------------------------------------------------------------------------


def _keys() -> list[ApiKey]:
    session = services().db()
    return list(session.scalars(select(ApiKey).where(ApiKey.account_id == _account_id()).order_by(ApiKey.id.desc())))


@bp.get("/keys")
def keys_page():
    return render("dashboard/keys.html", "dashboard/_keys.html", keys=_keys(), created=None)


@bp.post("/keys")
@verified_required
def create_key():
    svc = services()
    session = svc.db()
    name = request.form.get("name", "").strip()[:100]
    account = session.get(Account, _account_id())
    try:
        _, plain = keys.create_key(
            session, account, name, source="web", max_active=current_app.config["MAX_KEYS_PER_ACCOUNT"]
        )
    except BrokerError as error:
        # Shown on the keys page (a whole page load, so the flashed message appears).
        flash(error.message, "error")
        if is_partial():
            response = make_response("", 204)
            response.headers["HX-Redirect"] = url_for("dashboard.keys_page")
            return response
        return redirect(url_for("dashboard.keys_page"), code=303)
    return render("dashboard/keys.html", "dashboard/_keys.html", keys=_keys(), created={"name": name, "key": plain})


@bp.post("/keys/<int:key_id>/limits")
def key_limits(key_id: int):
    """Tighten one of your keys: fewer requests than the server allows, or a daily spend cap."""
    svc = services()
    session = svc.db()
    row = session.get(ApiKey, key_id)
    if row is None or row.account_id != _account_id():
        abort(404)
    defaults = current_app.config["DEFAULT_LIMITS"]
    try:
        per_minute = _bounded(request.form.get("per_minute"), defaults.per_minute, "Requests a minute")
        per_day = _bounded(request.form.get("per_day"), defaults.per_day, "Requests a day")
        cap = request.form.get("credits_per_day", "").strip()
        cap_ucr = pricing.spend_cap_ucr(cap) if cap else None
    except ValueError as error:
        return make_response(str(error), 400)
    keys.set_limits(session, svc.redis, key_id, per_minute, per_day, cap_ucr)
    return render("dashboard/keys.html", "dashboard/_keys.html", keys=_keys(), created=None)


def _bounded(raw: str | None, ceiling: int, what: str) -> int | None:
    """A whole number from 1 to ``ceiling`` (the server's own limit), None when left empty."""
    if not raw or not raw.strip():
        return None
    rule = f"{what} must be a whole number from 1 to {ceiling:,} (the server's limit)."
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(rule) from None
    if not 1 <= value <= ceiling:
        raise ValueError(rule)
    return value


@bp.delete("/keys/<int:key_id>")
def revoke_key(key_id: int):
    svc = services()
    try:
        keys.revoke_key(svc.db(), svc.redis, _account_id(), key_id)
    except NotFound:
        abort(404)
    return render("dashboard/keys.html", "dashboard/_keys.html", keys=_keys(), created=None)


# -- usage ------------------------------------------------------------------------------


def _usage_rows(model: str | None, cursor: int | None, limit: int = PAGE) -> dict:
    return usage.list_usage(services().db(), _account_id(), limit=limit, before=cursor, model=model)


def _filters() -> tuple[str | None, int | None, int]:
    model = request.args.get("model") or None
    cursor = request.args.get("cursor", type=int)
    days = 30 if request.args.get("days") == "30" else 7
    return model, cursor, days


@bp.get("/usage")
def usage_page():
    _fresh_usage()
    model, cursor, days = _filters()
    series = usage.daily_series(services().db(), _account_id(), days)
    spend = {m: [v / 1_000_000 for v in values] for m, values in series["spend"].items()}
    context = {
        "page": _usage_rows(model, cursor),
        "model": model,
        "days": days,
        "models": series["models"],
        "spend_chart": charts.stacked(series["dates"], spend, "credits"),
        "requests_chart": charts.stacked(series["dates"], {"requests": series["requests"]}, "requests"),
    }
    partial = (
        "dashboard/_usage_table.html" if request.headers.get("HX-Target") == "usage-table" else "dashboard/_usage.html"
    )
    return render("dashboard/usage.html", partial, **context)


@bp.get("/usage.csv")
def usage_csv():
    model, _, _ = _filters()
    session = services().db()
    query = select(UsageRecord).where(UsageRecord.account_id == _account_id()).order_by(UsageRecord.id.desc())
    if model:
        query = query.where(UsageRecord.model == model)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["time", "request_id", "model", "endpoint", "status", "input_tokens", "output_tokens", "credits"])
    for row in session.scalars(query.limit(10_000)):
        receipt = usage.receipt(row)
        writer.writerow(
            [
                receipt["started_at"],
                row.request_id,
                row.model,
                row.endpoint,
                row.status,
                row.input_tokens,
                row.output_tokens,
                receipt["credits_charged"],
            ]
        )
    return Response(
        out.getvalue(),
        mimetype="text/csv",
        headers={"Content-Disposition": "attachment; filename=usage.csv"},
    )


@bp.get("/requests/<request_id>")
def receipt(request_id: str):
    try:
        data = usage.get_receipt(services().db(), _account_id(), request_id)
    except NotFound:
        abort(404)
    return render("dashboard/receipt.html", "dashboard/_receipt.html", receipt=data)


# -- jobs -------------------------------------------------------------------------------


def _job_view(job: Job) -> dict:
    session = services().db()
    return media.job_json(
        job, media.results_of(session, job.id), lambda job_id, index: f"/dashboard/jobs/{job_id}/content/{index}"
    )


@bp.get("/jobs")
def jobs_page():
    jobs, _ = media.list_jobs(services().db(), _account_id(), 50, None, None, None)
    return render("dashboard/jobs.html", "dashboard/_jobs.html", jobs=[_job_view(j) for j in jobs])


@bp.get("/jobs/<job_id>/row")
def job_row(job_id: str):
    try:
        job = media.get_job(services().db(), _account_id(), job_id)
    except NotFound:
        abort(404)
    response = make_response(render_template("dashboard/_job_row.html", job=_job_view(job)))
    if job.status in media.TERMINAL and job.cost_ucr is not None:
        response.headers["HX-Trigger"] = "balance-changed"
    return response


@bp.get("/jobs/<job_id>/content/<int:index>")
def job_content(job_id: str, index: int):
    svc = services()
    session = svc.db()
    try:
        job = media.get_job(session, _account_id(), job_id)
    except NotFound:
        abort(404)
    result = next((r for r in media.results_of(session, job.id) if r.index == index), None)
    if result is None or job.media_expired:
        abort(404)
    return Response(
        svc.media.storage.stream(result.storage_key),
        mimetype=result.content_type,
        headers={"Content-Length": str(result.bytes)},
    )


# -- billing ----------------------------------------------------------------------------


def _billing_context() -> dict:
    svc = services()
    catalogue = svc.catalogue
    return {
        "purchases": [billing_domain.purchase_json(p) for p in billing_domain.purchases_of(svc.db(), _account_id())],
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
            _account_id(),
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
        if purchase is None or purchase.account_id != _account_id():
            abort(404)
        if purchase.status == "paid":
            flash(f"Payment received: {pricing.format_credits(purchase.credits_ucr)} credits added.", "info")
        else:
            flash("Payment is processing; the credits appear here as soon as it settles.", "info")
    response = redirect(url_for("dashboard.billing"))
    response.headers["HX-Trigger"] = "balance-changed"
    return response
