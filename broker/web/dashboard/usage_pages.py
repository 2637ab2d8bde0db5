"""Dashboard: usage charts, spend per key, the request table, receipts and the CSV export.

One set of filters (period, model, key, endpoint) drives the charts, the totals, the table and
the CSV alike. Totals and charts come from the daily roll-ups; the table pages by id both ways;
the CSV streams every matching request, read in batches.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from datetime import UTC, datetime

from flask import Response, abort, request, stream_with_context
from sqlalchemy import select

from broker import charts, usage
from broker.errors import NotFound
from broker.extensions import services
from broker.models import ApiKey
from broker.pricing import format_credits
from broker.web.dashboard import PAGE, account_id, bp, fresh_usage, render

PERIODS = {1: "Today", 7: "7 days", 30: "30 days", 90: "90 days"}
CSV_CHUNK = 500  # rows per written piece of the streamed CSV


def _filters() -> tuple[int, usage.Filters]:
    """The period in days and the filters, from the query string (unknown values are ignored)."""
    days = request.args.get("days", type=int)
    days = days if days in PERIODS else 7
    key = request.args.get("key", type=int)
    filters = usage.Filters(
        model=request.args.get("model") or None,
        key_id=key if key is not None and key >= 0 else None,
        endpoint=request.args.get("endpoint") or None,
        since=usage.period(days).since,
    )
    return days, filters


def _args(days: int, filters: usage.Filters) -> dict:
    """The filters as query arguments, for links that keep them."""
    args = {"days": days, "model": filters.model, "key": filters.key_id, "endpoint": filters.endpoint}
    return {name: value for name, value in args.items() if value is not None}


def _key_names() -> dict[int, str]:
    rows = (
        services()
        .db()
        .execute(
            select(ApiKey.id, ApiKey.name, ApiKey.prefix, ApiKey.revoked_at).where(ApiKey.account_id == account_id())
        )
    )
    names = {usage.NO_KEY: "No key"}
    for key_id, name, prefix, revoked in rows:
        names[key_id] = f"{name or 'Unnamed'} ({prefix}…){' — revoked' if revoked else ''}"
    return names


@bp.get("/usage")
def usage_page():
    fresh_usage()
    session = services().db()
    days, filters = _filters()
    page = usage.list_usage(
        session,
        account_id(),
        limit=PAGE,
        before=request.args.get("cursor", type=int),
        after=request.args.get("after", type=int),
        since=filters.since,
        model=filters.model,
        key_id=filters.key_id,
        endpoint=filters.endpoint,
    )
    context = {"page": page, "days": days, "filters": filters, "args": _args(days, filters), "periods": PERIODS}
    if request.headers.get("HX-Target") == "usage-table":
        return render("dashboard/usage.html", "dashboard/_usage_table.html", **context)
    names = _key_names()

    def label(key_id: int) -> str:
        return names.get(key_id, f"Key {key_id}")

    series = usage.daily_series(session, account_id(), days, filters=filters)
    spend = {m: [v / 1_000_000 for v in values] for m, values in series["spend"].items()}
    by_key = usage.totals_by(session, account_id(), filters, "key_id")
    found = usage.choices(session, account_id())
    context |= {
        "models": found["models"],
        "endpoints": found["endpoints"],
        "keys": [(key_id, label(key_id)) for key_id in sorted(set(found["key_ids"]) | set(names))],
        "by_key": [
            {**row, "name": label(row["key_id"]), "credits": format_credits(row["charged_ucr"])} for row in by_key
        ],
        "total_requests": sum(row["requests"] for row in by_key),
        "total_credits": format_credits(sum(row["charged_ucr"] for row in by_key)),
        "spend_chart": charts.stacked(series["dates"], spend, "credits"),
        "requests_chart": charts.stacked(series["dates"], {"requests": series["requests"]}, "requests"),
    }
    return render("dashboard/usage.html", "dashboard/_usage.html", **context)


def _csv_lines(rows: Iterator[tuple]) -> Iterator[str]:
    """CSV text in pieces of ``CSV_CHUNK`` rows, so the response streams without holding the file."""
    out = io.StringIO()
    writer = csv.writer(out)
    for count, row in enumerate(rows, start=1):
        writer.writerow(row)
        if count % CSV_CHUNK == 0:
            yield out.getvalue()
            out.seek(0)
            out.truncate()
    yield out.getvalue()


@bp.get("/usage.csv")
def usage_csv():
    fresh_usage()
    days, filters = _filters()
    rows = usage.csv_rows(services().db(), account_id(), filters)
    name = f"usage-{datetime.now(UTC):%Y-%m-%d}-{days}d.csv"
    return Response(
        stream_with_context(_csv_lines(rows)),
        mimetype="text/csv",
        headers={"Content-Disposition": f"attachment; filename={name}"},
    )


@bp.get("/requests/<request_id>")
def receipt(request_id: str):
    try:
        data = usage.get_receipt(services().db(), account_id(), request_id)
    except NotFound:
        abort(404)
    return render("dashboard/receipt.html", "dashboard/_receipt.html", receipt=data)
