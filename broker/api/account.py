"""Account routes: balance, models with prices, usage history and per-request receipts."""

from __future__ import annotations

from datetime import datetime

from flask import g, jsonify, request

from broker import pricing, usage
from broker.api import bp
from broker.errors import InvalidRequest
from broker.extensions import services


@bp.get("/balance")
def balance():
    snap = services().ledger.snapshot(g.caller.account_id)
    return jsonify(
        {
            "object": "balance",
            "available_credits": pricing.format_credits(snap["balance"]),
            "held_credits": pricing.format_credits(snap["holds_sum"]),
            "available_ucr": snap["balance"],
            "held_ucr": snap["holds_sum"],
            "credit_usd": str(services().metering.credit_usd),
        }
    )


@bp.get("/models")
def models():
    svc = services()
    m = svc.metering
    data = [
        {
            "id": price.id,
            "object": "model",
            "created": 0,
            "owned_by": price.provider,
            "kind": price.kind,
            "max_output_tokens": price.max_output_tokens or None,
            "context_window": price.context_window or None,
            "pricing": {"markup": str(m.markup), **pricing.price_summary(price, m.markup, m.credit_usd)},
        }
        for price in svc.prices.models.values()
        if _serves(svc, price)
    ]
    return jsonify({"object": "list", "data": data})


def _serves(svc, price) -> bool:
    by_kind = {"chat": svc.providers, "tts": svc.media.speech, "image": svc.media.images, "music": svc.media.music}
    return price.provider in by_kind[price.kind]


def _int_arg(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise InvalidRequest(f"'{name}' must be an integer from {low} to {high}.", param=name)
    return int(raw)


def _date_arg(name: str) -> datetime | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        return datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an ISO 8601 date or time.", param=name) from None


@bp.get("/usage")
def usage_list():
    svc = services()
    session = svc.db()
    svc.ledger.drain(session, [g.caller.account_id])
    page = usage.list_usage(
        session,
        g.caller.account_id,
        limit=_int_arg("limit", 20, 1, 100),
        before=_int_arg("cursor", None, 1, 2**62),
        since=_date_arg("from"),
        until=_date_arg("to"),
        model=request.args.get("model"),
    )
    return jsonify(page)


@bp.get("/requests/<request_id>")
def receipt(request_id: str):
    svc = services()
    session = svc.db()
    svc.ledger.drain(session, [g.caller.account_id])
    return jsonify(usage.get_receipt(session, g.caller.account_id, request_id))
