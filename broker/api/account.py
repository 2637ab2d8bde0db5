"""Account routes: balance, models with prices, usage history and per-request receipts."""

from __future__ import annotations

from flask import g, jsonify

from broker import pricing, usage
from broker.api import bp, parse_query
from broker.api.openapi import operation
from broker.extensions import services
from broker.schemas import Balance, ModelList, Receipt, UsageList, UsageQuery


@bp.get("/balance")
@operation(summary="Your available and held credits", tag="Account", response=Balance)
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
@operation(summary="Models you can call, with prices in credits", tag="Account", response=ModelList)
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


@bp.get("/usage")
@operation(
    summary="Your metered requests, newest first",
    tag="Account",
    query=UsageQuery,
    response=UsageList,
)
def usage_list():
    svc = services()
    session = svc.db()
    svc.ledger.drain(session, [g.caller.account_id])
    query = parse_query(UsageQuery)
    page = usage.list_usage(
        session,
        g.caller.account_id,
        limit=query.limit,
        before=query.cursor,
        since=query.from_,
        until=query.to,
        model=query.model,
    )
    return jsonify(page)


@bp.get("/requests/<request_id>")
@operation(
    summary="The receipt of one request",
    description="`request_id` is the `X-Request-Id` of the request (a media job's `request_id`).",
    tag="Account",
    response=Receipt,
    errors=("401", "404", "429", "503"),
)
def receipt(request_id: str):
    svc = services()
    session = svc.db()
    svc.ledger.drain(session, [g.caller.account_id])
    return jsonify(usage.get_receipt(session, g.caller.account_id, request_id))
