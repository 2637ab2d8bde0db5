"""Dashboard: API keys (create with an optional expiry, show once, limits, revoke).

Each change answers with the keys fragment (HTMX) or the whole page, carrying a notice or an
error that takes the focus (``autofocus``: htmx focuses it after the swap, the browser on a
page load). A form the server refuses answers 422 with the form and its error in place; the
htmx configuration in ``base.html`` swaps a 422 in. Revoking works without JavaScript too:
a POST form asks to confirm on a page of its own, then revokes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from flask import Response, abort, current_app, flash, redirect, render_template, request, url_for
from sqlalchemy import select

from broker import keys, pricing
from broker.errors import BrokerError, NotFound
from broker.extensions import services
from broker.models import Account, ApiKey
from broker.web.auth import verified_required
from broker.web.dashboard import account_id, bp, render

# The expiries a new key may have, in days ("" is never).
EXPIRY_CHOICES = (("", "Never"), ("7", "In 7 days"), ("30", "In 30 days"), ("90", "In 90 days"), ("365", "In 1 year"))


def _keys() -> list[ApiKey]:
    session = services().db()
    return list(session.scalars(select(ApiKey).where(ApiKey.account_id == account_id()).order_by(ApiKey.id.desc())))


def _page(status: int = 200, **context) -> Response:
    """The keys fragment or page, with everything the template needs and ``context`` on top."""
    values = {
        "keys": _keys(),
        "created": None,
        "notice": None,
        "error": None,
        "limit_error": None,
        "expiry_choices": EXPIRY_CHOICES,
        "key_status": _status,
    }
    values.update(context)
    response = render("dashboard/keys.html", "dashboard/_keys.html", **values)
    response.status_code = status
    return response


def _status(row: ApiKey) -> str:
    """active, expired or revoked."""
    if row.revoked_at is not None:
        return "revoked"
    expires = row.expires_at
    if expires is not None and (expires if expires.tzinfo else expires.replace(tzinfo=UTC)) <= datetime.now(UTC):
        return "expired"
    return "active"


def _label(row: ApiKey) -> str:
    return f"“{row.name}”" if row.name else f"{row.prefix}…"


def _own_key(key_id: int) -> ApiKey:
    row = services().db().get(ApiKey, key_id)
    if row is None or row.account_id != account_id():
        abort(404)
    return row


@bp.get("/keys")
def keys_page():
    return _page()


@bp.post("/keys")
@verified_required
def create_key():
    svc = services()
    session = svc.db()
    name = request.form.get("name", "").strip()[:100]
    days = request.form.get("expires_in_days", "").strip()
    if days not in dict(EXPIRY_CHOICES):
        return _page(422, error="Choose when the key expires from the list.")
    expires_at = datetime.now(UTC) + timedelta(days=int(days)) if days else None
    account = session.get(Account, account_id())
    try:
        _, plain = keys.create_key(
            session,
            account,
            name,
            expires_at=expires_at,
            source="web",
            max_active=current_app.config["MAX_KEYS_PER_ACCOUNT"],
        )
    except BrokerError as error:
        return _page(422, error=error.message)
    return _page(created={"name": name, "key": plain, "expires_at": expires_at})


@bp.post("/keys/<int:key_id>/limits")
def key_limits(key_id: int):
    """Tighten one of your keys: fewer requests than the server allows, or a daily spend cap."""
    svc = services()
    row = _own_key(key_id)
    defaults = current_app.config["DEFAULT_LIMITS"]
    form = {name: request.form.get(name, "").strip() for name in ("per_minute", "per_day", "credits_per_day")}
    errors: dict[str, str] = {}
    per_minute = _bounded(form["per_minute"], defaults.per_minute, "Requests a minute", "per_minute", errors)
    per_day = _bounded(form["per_day"], defaults.per_day, "Requests a day", "per_day", errors)
    cap_ucr = None
    if form["credits_per_day"]:
        try:
            cap_ucr = pricing.spend_cap_ucr(form["credits_per_day"])
        except ValueError as error:
            errors["credits_per_day"] = str(error)
    if errors:
        return _page(422, limit_error={"key_id": key_id, "fields": errors, "values": form})
    keys.set_limits(svc.db(), svc.redis, key_id, per_minute, per_day, cap_ucr)
    return _page(notice=f"Limits saved for {_label(row)}.")


def _bounded(raw: str, ceiling: int, what: str, field: str, errors: dict[str, str]) -> int | None:
    """A whole number from 1 to ``ceiling`` (the server's own limit), None when left empty."""
    if not raw:
        return None
    if raw.isdigit() and 1 <= int(raw) <= ceiling:
        return int(raw)
    errors[field] = f"{what} must be a whole number from 1 to {ceiling:,} (the server's limit)."
    return None


@bp.delete("/keys/<int:key_id>")
def revoke_key(key_id: int):
    svc = services()
    try:
        row = keys.revoke_key(svc.db(), svc.redis, account_id(), key_id)
    except NotFound:
        abort(404)
    return _page(notice=f"Key {_label(row)} is revoked: requests with it fail from now on.")


@bp.post("/keys/<int:key_id>/revoke")
def revoke_key_form(key_id: int):
    """Revoke without JavaScript: the first POST asks to confirm, the second (``confirm=yes``) revokes."""
    row = _own_key(key_id)
    if request.form.get("confirm") != "yes":
        return render_template("dashboard/revoke_key.html", key=row, label=_label(row))
    svc = services()
    keys.revoke_key(svc.db(), svc.redis, account_id(), key_id)
    flash(f"Key {_label(row)} is revoked: requests with it fail from now on.", "success")
    return redirect(url_for("dashboard.keys_page"), code=303)
