"""The HTMX dashboard: balance, keys, usage (charts, table, CSV), jobs and billing; every page also works whole.

One blueprint; each page's views live in a module of this package (``keys``, ``usage``,
``jobs``, ``billing``), which registers its routes on ``bp`` when imported below.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, Response, make_response, render_template, request
from flask_login import current_user, login_required

from broker import pricing, usage
from broker.extensions import services

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


def account_id() -> int:
    return current_user.account_id


def fresh_usage() -> None:
    """Copy this account's pending ledger entries and roll up today, so what it sees is current."""
    svc = services()
    svc.ledger.drain(svc.db(), [account_id()])
    usage.rollup_days(svc.db(), days=1, account_id=account_id())


# -- overview and balance -----------------------------------------------------------


def _balance_context() -> dict:
    svc = services()
    snap = svc.ledger.snapshot(account_id())
    now = datetime.now(UTC)
    session = svc.db()
    return {
        "available": pricing.format_credits(snap["balance"]),
        "held": pricing.format_credits(snap["holds_sum"]),
        "today": pricing.format_credits(
            usage.spent_since(session, account_id(), now.replace(hour=0, minute=0, second=0, microsecond=0))
        ),
        "month": pricing.format_credits(
            usage.spent_since(session, account_id(), now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
        ),
    }


@bp.get("/")
def overview():
    fresh_usage()
    recent = usage.list_usage(services().db(), account_id(), limit=5)["data"]
    return render("dashboard/overview.html", "dashboard/_balance.html", recent=recent, **_balance_context())


@bp.get("/balance")
def balance():
    return render("dashboard/overview.html", "dashboard/_balance.html", recent=[], **_balance_context())


from broker.web.dashboard import billing, jobs, keys, usage_pages  # noqa: E402,F401  (routes register on bp)
