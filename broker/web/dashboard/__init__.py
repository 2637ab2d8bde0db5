"""The HTMX dashboard: balance, keys, usage (charts, table, CSV), jobs and billing; every page also works whole.

One blueprint; each page's views live in a module of this package (``keys``, ``usage``,
``jobs``, ``billing``), which registers its routes on ``bp`` when imported below.
"""

from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, Response, current_app, make_response, render_template, request
from flask_login import current_user, login_required

from broker import docs_render, getting_started, hosts, usage
from broker.extensions import services
from broker.web import enabled_models

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
    """Copy this account's pending ledger entries (and so their roll-ups), so what it sees is current."""
    svc = services()
    svc.ledger.drain(svc.db(), [account_id()])


# -- overview and balance -----------------------------------------------------------


def _balance_context() -> dict:
    """Amounts in micro-credits; the templates format them (``credits`` and ``credits_usd`` filters)."""
    svc = services()
    snap = svc.ledger.snapshot(account_id())
    now = datetime.now(UTC)
    session = svc.db()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return {
        "available_ucr": snap["balance"],
        "held_ucr": snap["holds_sum"],
        "today_ucr": usage.spent_since(session, account_id(), midnight),
        "month_ucr": usage.spent_since(session, account_id(), midnight.replace(day=1)),
    }


def _overview_context() -> dict:
    """The balance, the last few requests and the first steps with a first call to copy."""
    fresh_usage()
    session = services().db()
    context = _balance_context()
    steps = getting_started.progress(session, account_id(), current_user.verified, context["available_ucr"])
    chat_model = docs_render.default_models(enabled_models())["chat"]
    return {
        **context,
        "recent": usage.list_usage(session, account_id(), limit=5)["data"],
        "steps": steps,
        "trial_credits": current_app.config["TRIAL_CREDITS"],
        "base_url": hosts.public_base_url(),
        "first_call": docs_render.quickstart(hosts.public_base_url(), chat_model),
    }


@bp.get("/")
def overview():
    return render("dashboard/overview.html", "dashboard/_balance.html", **_overview_context())


@bp.get("/balance")
def balance():
    if is_partial():
        return render("dashboard/overview.html", "dashboard/_balance.html", **_balance_context())
    return render("dashboard/overview.html", "dashboard/_balance.html", **_overview_context())


from broker.web.dashboard import billing, jobs, keys, usage_pages  # noqa: E402,F401  (routes register on bp)
