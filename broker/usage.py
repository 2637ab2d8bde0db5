"""Reading usage: receipts and the paged, filtered list of an account's metered requests."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from broker.errors import NotFound
from broker.models import UsageRecord
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
