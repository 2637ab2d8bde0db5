"""Account routes: balance, usage history and per-request receipts."""

from __future__ import annotations

from flask import g, jsonify

from broker import pricing, usage
from broker.api import bp, parse_query
from broker.api.openapi import operation
from broker.extensions import services
from broker.schemas import Balance, Receipt, UsageList, UsageQuery


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


@bp.get("/usage")
@operation(
    summary="Your metered requests, newest first",
    description="Filter by period (`from`, `to`), `model`, `key_id` and `endpoint`; page to older requests with "
    "`cursor` (a page's `next_cursor`) and to newer ones with `after` (its `prev_cursor`).",
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
        after=query.after,
        since=query.from_,
        until=query.to,
        model=query.model,
        key_id=query.key_id,
        endpoint=query.endpoint,
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
