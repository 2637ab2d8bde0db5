"""Dashboard: API keys (create, show once, limits, revoke)."""

from __future__ import annotations

from flask import abort, current_app, flash, make_response, redirect, request, url_for
from sqlalchemy import select

from broker import keys, pricing
from broker.errors import BrokerError, NotFound
from broker.extensions import services
from broker.models import Account, ApiKey
from broker.web.auth import verified_required
from broker.web.dashboard import account_id, bp, is_partial, render


def _keys() -> list[ApiKey]:
    session = services().db()
    return list(session.scalars(select(ApiKey).where(ApiKey.account_id == account_id()).order_by(ApiKey.id.desc())))


@bp.get("/keys")
def keys_page():
    return render("dashboard/keys.html", "dashboard/_keys.html", keys=_keys(), created=None)


@bp.post("/keys")
@verified_required
def create_key():
    svc = services()
    session = svc.db()
    name = request.form.get("name", "").strip()[:100]
    account = session.get(Account, account_id())
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
    if row is None or row.account_id != account_id():
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
        keys.revoke_key(svc.db(), svc.redis, account_id(), key_id)
    except NotFound:
        abort(404)
    return render("dashboard/keys.html", "dashboard/_keys.html", keys=_keys(), created=None)
