"""Reading usage: receipts and the paged, filtered list of an account's metered requests."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from broker.errors import NotFound
from broker.models import UsageDaily, UsageRecord
from broker.pricing import format_credits


def _utc(moment: datetime) -> str:
    """ISO 8601 in UTC; SQLite hands timestamps back without their zone."""
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat()


def receipt(row: UsageRecord) -> dict:
    return {
        "id": row.request_id,
        "object": "receipt",
        "endpoint": row.endpoint,
        "provider": row.provider,
        "model": row.model,
        "status": row.status,
        "stream": row.stream,
        "tokens": {
            "input": row.input_tokens,
            "cached_input": row.cached_input_tokens,
            "cache_write": row.cache_write_tokens,
            "cache_write_1h": row.cache_write_1h_tokens,
            "output": row.output_tokens,
        },
        "provider_cost_usd": row.cost_usd,
        "markup": row.markup,
        "credits_charged": format_credits(row.charged_ucr),
        "charged_ucr": row.charged_ucr,
        "hold_ucr": row.hold_ucr,
        "flags": {"estimated": row.estimated, "capped": row.capped},
        "error_code": row.error_code,
        "detail": json.loads(row.detail) if row.detail else None,
        "started_at": _utc(row.started_at),
        "finished_at": _utc(row.finished_at),
    }


def get_receipt(session: Session, account_id: int, request_id: str) -> dict:
    row = session.scalar(select(UsageRecord).where(UsageRecord.request_id == request_id))
    if row is None or row.account_id != account_id:
        raise NotFound(f"No request '{request_id}'.", param="id")
    return receipt(row)


def list_usage(
    session: Session,
    account_id: int,
    limit: int = 20,
    before: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    model: str | None = None,
) -> dict:
    """Newest first; ``before`` is the cursor from the previous page's ``next_cursor``."""
    query = select(UsageRecord).where(UsageRecord.account_id == account_id)
    if before:
        query = query.where(UsageRecord.id < before)
    if since:
        query = query.where(UsageRecord.started_at >= since)
    if until:
        query = query.where(UsageRecord.started_at < until)
    if model:
        query = query.where(UsageRecord.model == model)
    rows = list(session.scalars(query.order_by(UsageRecord.id.desc()).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "object": "list",
        "data": [receipt(row) for row in rows],
        "has_more": more,
        "next_cursor": rows[-1].id if more else None,
    }


def rollup_days(session: Session, days: int = 2, today: date | None = None, account_id: int | None = None) -> int:
    """Recompute the daily totals of the last ``days`` days from usage records (idempotent).

    With ``account_id``, only that account's (the dashboard refreshes its own view).
    """
    today = today or datetime.now(UTC).date()
    written = 0
    for offset in range(days):
        day = today - timedelta(days=offset)
        start = datetime.combine(day, time.min, tzinfo=UTC)
        rows = session.execute(
            select(
                UsageRecord.account_id,
                UsageRecord.model,
                func.count(),
                func.coalesce(func.sum(UsageRecord.charged_ucr), 0),
            )
            .where(UsageRecord.started_at >= start, UsageRecord.started_at < start + timedelta(days=1))
            .where(UsageRecord.account_id == account_id if account_id else True)
            .group_by(UsageRecord.account_id, UsageRecord.model)
        ).all()
        values = [
            {"account_id": a, "day": day, "model": m, "requests": n, "charged_ucr": int(c)} for a, m, n, c in rows
        ]
        if values:
            insert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[session.get_bind().dialect.name]
            statement = insert(UsageDaily)
            session.execute(
                statement.on_conflict_do_update(
                    index_elements=["account_id", "day", "model"],
                    set_={"requests": statement.excluded.requests, "charged_ucr": statement.excluded.charged_ucr},
                ),
                values,
            )
        written += len(values)
    session.commit()
    return written


def daily_series(session: Session, account_id: int, days: int, today: date | None = None) -> dict:
    """Credits and requests per day (oldest first) over the last ``days`` days, split by model."""
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=days - 1)
    rows = session.execute(
        select(UsageDaily.day, UsageDaily.model, UsageDaily.requests, UsageDaily.charged_ucr).where(
            UsageDaily.account_id == account_id, UsageDaily.day >= first
        )
    ).all()
    dates = [first + timedelta(days=i) for i in range(days)]
    models = sorted({model for _, model, _, _ in rows})
    spend = {model: [0] * days for model in models}
    requests = [0] * days
    for day, model, count, charged in rows:
        index = (day - first).days
        if 0 <= index < days:
            spend[model][index] += charged
            requests[index] += count
    return {"dates": dates, "models": models, "spend": spend, "requests": requests}


def spent_since(session: Session, account_id: int, since: datetime) -> int:
    """Micro-credits charged to the account since a moment (from the usage records)."""
    return int(
        session.scalar(
            select(func.coalesce(func.sum(UsageRecord.charged_ucr), 0)).where(
                UsageRecord.account_id == account_id, UsageRecord.started_at >= since
            )
        )
    )
