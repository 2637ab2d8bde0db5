"""Dashboard: usage charts, the table, receipts and the CSV export."""

from __future__ import annotations

import csv
import io

from flask import Response, abort, request
from sqlalchemy import select

from broker import charts, usage
from broker.errors import NotFound
from broker.extensions import services
from broker.models import UsageRecord
from broker.web.dashboard import PAGE, account_id, bp, fresh_usage, render


def _usage_rows(model: str | None, cursor: int | None, limit: int = PAGE) -> dict:
    return usage.list_usage(services().db(), account_id(), limit=limit, before=cursor, model=model)


def _filters() -> tuple[str | None, int | None, int]:
    model = request.args.get("model") or None
    cursor = request.args.get("cursor", type=int)
    days = 30 if request.args.get("days") == "30" else 7
    return model, cursor, days


@bp.get("/usage")
def usage_page():
    fresh_usage()
    model, cursor, days = _filters()
    series = usage.daily_series(services().db(), account_id(), days)
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
    query = select(UsageRecord).where(UsageRecord.account_id == account_id()).order_by(UsageRecord.id.desc())
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
        data = usage.get_receipt(services().db(), account_id(), request_id)
    except NotFound:
        abort(404)
    return render("dashboard/receipt.html", "dashboard/_receipt.html", receipt=data)
