"""Reading usage: receipts, the filtered and paged list of an account's requests, the CSV rows, and roll-ups.

Totals and charts come from ``usage_daily`` (per account, UTC day, model, key and endpoint),
which ``store_records`` keeps current in the transaction that stores the records, so no page
ever sums the records themselves. Lists read the records newest first by id through an index
that matches their filter; a period becomes an id range taken from the roll-ups' ``first_id``
and ``last_id``, so a sparse filter never walks records outside the period.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import Select, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from broker.errors import NotFound
from broker.models import UsageDaily, UsageRecord
from broker.pricing import format_credits

NO_KEY = 0  # usage_daily.key_id of requests made without an API key


@dataclass(frozen=True)
class Filters:
    """What a usage view is limited to; the same for its totals, charts, list and CSV.

    ``since``/``until`` bound ``started_at`` (``until`` excluded); ``key_id`` 0 means "no key".
    """

    model: str | None = None
    key_id: int | None = None
    endpoint: str | None = None
    since: datetime | None = None
    until: datetime | None = None


def _utc(moment: datetime) -> str:
    """ISO 8601 in UTC; SQLite hands timestamps back without their zone."""
    return _aware(moment).isoformat()


def _aware(moment: datetime) -> datetime:
    return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)


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


# -- writing: records and their roll-ups together ------------------------------------------


def _insert(session: Session):
    return {"postgresql": postgresql.insert, "sqlite": sqlite.insert}[session.get_bind().dialect.name]


def store_records(session: Session, rows: list[dict]) -> int:
    """Insert usage records (a replayed ``request_id`` is skipped) and add the new ones to the roll-ups.

    Runs in the caller's transaction, so records and roll-ups commit together. Returns how
    many records were new.
    """
    if not rows:
        return 0
    statement = (
        _insert(session)(UsageRecord)
        .on_conflict_do_nothing(index_elements=["request_id"])
        .returning(
            UsageRecord.id,
            UsageRecord.account_id,
            UsageRecord.started_at,
            UsageRecord.model,
            UsageRecord.key_id,
            UsageRecord.endpoint,
            UsageRecord.charged_ucr,
        )
    )
    inserted = session.execute(statement, rows).all()
    buckets: dict[tuple, dict] = {}
    for record_id, account, started, model, key_id, endpoint, charged in inserted:
        bucket_key = (account, _aware(started).date(), model, key_id or NO_KEY, endpoint)
        bucket = buckets.get(bucket_key)
        if bucket is None:
            buckets[bucket_key] = bucket = dict(
                zip(("account_id", "day", "model", "key_id", "endpoint"), bucket_key, strict=True),
                requests=0,
                charged_ucr=0,
                first_id=record_id,
                last_id=record_id,
            )
        bucket["requests"] += 1
        bucket["charged_ucr"] += charged
        bucket["first_id"] = min(bucket["first_id"], record_id)
        bucket["last_id"] = max(bucket["last_id"], record_id)
    if buckets:
        # Sorted, so concurrent writers lock the same roll-up rows in the same order (no deadlock).
        _upsert_buckets(session, sorted(buckets.values(), key=_bucket_order), add=True)
    return len(inserted)


def add_late_charge(session: Session, receipt: dict, late_ucr: int) -> None:
    """A settle that arrived after its hold expired: the request's record (written by the expiry,
    which knew only the hold) takes the settle's receipt and the late charge on top of what the
    expiry charged; its roll-up moves with it."""
    record = session.scalar(select(UsageRecord).where(UsageRecord.request_id == receipt["request_id"]))
    if record is None:  # the expiry's record is not there: this receipt is the record
        store_records(session, [{**receipt, "charged_ucr": late_ucr}])
        return
    before = _bucket_of(record, -1, -record.charged_ucr)
    for name, value in receipt.items():
        if name not in ("request_id", "account_id", "charged_ucr", "started_at", "hold_ucr"):
            setattr(record, name, value)
    record.charged_ucr += late_ucr
    session.flush()
    after = _bucket_of(record, 1, record.charged_ucr)
    _upsert_buckets(session, sorted([before, after], key=_bucket_order), add=True)


def _bucket_of(record: UsageRecord, requests: int, charged_ucr: int) -> dict:
    return {
        "account_id": record.account_id,
        "day": _aware(record.started_at).date(),
        "model": record.model,
        "key_id": record.key_id or NO_KEY,
        "endpoint": record.endpoint,
        "requests": requests,
        "charged_ucr": charged_ucr,
        "first_id": record.id,
        "last_id": record.id,
    }


def _bucket_order(bucket: dict) -> tuple:
    return (bucket["account_id"], bucket["day"], bucket["model"], bucket["key_id"], bucket["endpoint"])


def _upsert_buckets(session: Session, values: list[dict], add: bool) -> None:
    """Insert roll-up rows; on an existing bucket add to it (``add``) or replace it (a recount)."""
    statement = _insert(session)(UsageDaily)
    new = statement.excluded
    if add:
        lesser = func.least if session.get_bind().dialect.name == "postgresql" else func.min
        greater = func.greatest if session.get_bind().dialect.name == "postgresql" else func.max
        changes = {
            "requests": UsageDaily.requests + new.requests,
            "charged_ucr": UsageDaily.charged_ucr + new.charged_ucr,
            "first_id": lesser(UsageDaily.first_id, new.first_id),
            "last_id": greater(UsageDaily.last_id, new.last_id),
        }
    else:
        changes = {name: getattr(new, name) for name in ("requests", "charged_ucr", "first_id", "last_id")}
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["account_id", "day", "model", "key_id", "endpoint"], set_=changes
        ),
        values,
    )


def rollup_days(session: Session, days: int = 2, today: date | None = None, account_id: int | None = None) -> int:
    """Recount the roll-ups of the last ``days`` days from the records (idempotent; a repair).

    ``store_records`` keeps them current as records arrive; the cron's recount only puts
    right what something other than ``store_records`` may have changed.
    """
    today = today or datetime.now(UTC).date()
    # The records of these days start at the smallest id their roll-ups hold: read from there,
    # not the whole table (without roll-ups for them, the whole table is read).
    first_day = today - timedelta(days=days - 1)
    low = session.scalar(
        select(func.min(UsageDaily.first_id))
        .where(UsageDaily.day >= first_day)
        .where(UsageDaily.account_id == account_id if account_id else True)
    )
    written = 0
    for offset in range(days):
        day = today - timedelta(days=offset)
        start = datetime.combine(day, time.min, tzinfo=UTC)
        key = func.coalesce(UsageRecord.key_id, NO_KEY)
        rows = session.execute(
            select(
                UsageRecord.account_id,
                UsageRecord.model,
                key,
                UsageRecord.endpoint,
                func.count(),
                func.coalesce(func.sum(UsageRecord.charged_ucr), 0),
                func.min(UsageRecord.id),
                func.max(UsageRecord.id),
            )
            .where(UsageRecord.started_at >= start, UsageRecord.started_at < start + timedelta(days=1))
            .where(UsageRecord.account_id == account_id if account_id else True)
            .where(UsageRecord.id >= low if low else True)
            .group_by(UsageRecord.account_id, UsageRecord.model, key, UsageRecord.endpoint)
        ).all()
        values = [
            {
                "account_id": a,
                "day": day,
                "model": m,
                "key_id": k,
                "endpoint": e,
                "requests": n,
                "charged_ucr": int(c),
                "first_id": lo,
                "last_id": hi,
            }
            for a, m, k, e, n, c, lo, hi in rows
        ]
        if values:
            _upsert_buckets(session, sorted(values, key=_bucket_order), add=False)
        written += len(values)
    session.commit()
    return written


# -- reading the roll-ups: totals, charts, choices -------------------------------------------


def _daily(columns: list, account_id: int, filters: Filters) -> Select:
    """A roll-up query limited to the filters (period by whole UTC days)."""
    query = select(*columns).where(UsageDaily.account_id == account_id)
    if filters.since:
        query = query.where(UsageDaily.day >= _aware(filters.since).date())
    if filters.until:
        query = query.where(UsageDaily.day <= _aware(filters.until).date())
    if filters.model:
        query = query.where(UsageDaily.model == filters.model)
    if filters.key_id is not None:
        query = query.where(UsageDaily.key_id == filters.key_id)
    if filters.endpoint:
        query = query.where(UsageDaily.endpoint == filters.endpoint)
    return query


def period(days: int, today: date | None = None) -> Filters:
    """The last ``days`` whole UTC days, today included."""
    today = today or datetime.now(UTC).date()
    return Filters(since=datetime.combine(today - timedelta(days=days - 1), time.min, tzinfo=UTC))


def daily_series(
    session: Session, account_id: int, days: int, today: date | None = None, filters: Filters | None = None
) -> dict:
    """Credits and requests per day (oldest first) over the last ``days`` days, split by model."""
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=days - 1)
    filters = filters or Filters()
    since = datetime.combine(first, time.min, tzinfo=UTC)
    rows = session.execute(
        _daily(
            [UsageDaily.day, UsageDaily.model, func.sum(UsageDaily.requests), func.sum(UsageDaily.charged_ucr)],
            account_id,
            Filters(filters.model, filters.key_id, filters.endpoint, since, None),
        ).group_by(UsageDaily.day, UsageDaily.model)
    ).all()
    dates = [first + timedelta(days=i) for i in range(days)]
    models = sorted({model for _, model, _, _ in rows})
    spend = {model: [0] * days for model in models}
    requests = [0] * days
    for day, model, count, charged in rows:
        index = (day - first).days
        if 0 <= index < days:
            spend[model][index] += int(charged)
            requests[index] += int(count)
    return {"dates": dates, "models": models, "spend": spend, "requests": requests}


def totals_by(session: Session, account_id: int, filters: Filters, column: str) -> list[dict]:
    """Requests and micro-credits per ``model``, ``key_id`` or ``endpoint`` (most spent first)."""
    group = getattr(UsageDaily, column)
    rows = session.execute(
        _daily([group, func.sum(UsageDaily.requests), func.sum(UsageDaily.charged_ucr)], account_id, filters).group_by(
            group
        )
    ).all()
    out = [{column: value, "requests": int(n), "charged_ucr": int(c)} for value, n, c in rows]
    return sorted(out, key=lambda row: (-row["charged_ucr"], str(row[column])))


def choices(session: Session, account_id: int) -> dict[str, list]:
    """The models, keys and endpoints this account has used (the filters' options)."""
    rows = session.execute(
        select(UsageDaily.model, UsageDaily.key_id, UsageDaily.endpoint)
        .where(UsageDaily.account_id == account_id)
        .distinct()
    ).all()
    return {
        "models": sorted({m for m, _, _ in rows}),
        "key_ids": sorted({k for _, k, _ in rows}),
        "endpoints": sorted({e for _, _, e in rows}),
    }


def spent_since(session: Session, account_id: int, since: datetime) -> int:
    """Micro-credits charged to the account since a moment.

    From the roll-ups when ``since`` is a UTC midnight (today, this month); from the records otherwise.
    """
    since = _aware(since)
    if since.timetz() == time.min.replace(tzinfo=UTC):
        query = _daily([func.coalesce(func.sum(UsageDaily.charged_ucr), 0)], account_id, Filters(since=since))
    else:
        query = select(func.coalesce(func.sum(UsageRecord.charged_ucr), 0)).where(
            UsageRecord.account_id == account_id, UsageRecord.started_at >= since
        )
    return int(session.scalar(query))


# -- reading the records: the list and the CSV ------------------------------------------------


def _id_range(session: Session, account_id: int, filters: Filters) -> tuple[int | None, int | None] | None:
    """The record ids a period can hold (None: unbounded on that side), from the roll-ups; None when none.

    Every record started on or after ``since`` lies in a roll-up of that day or later, so its id
    is at least their smallest ``first_id`` (and likewise for ``until``).
    """
    if not filters.since and not filters.until:
        return None, None
    low, high = session.execute(
        _daily([func.min(UsageDaily.first_id), func.max(UsageDaily.last_id)], account_id, filters)
    ).one()
    if low is None:
        return None
    return (int(low) if filters.since else None), (int(high) if filters.until else None)


def _tighter(bound: int | None, other: int | None, pick) -> int | None:
    return other if bound is None else bound if other is None else pick(bound, other)


def _records(columns: list, account_id: int, filters: Filters, low: int | None, high: int | None) -> Select:
    """Records matching the filters with ids in [low, high], as the index of the filter reads them.

    One bound per side: given two, a planner may seek by the looser one and walk from there.
    """
    query = select(*columns).where(UsageRecord.account_id == account_id)
    if filters.model:
        query = query.where(UsageRecord.model == filters.model)
    if filters.key_id is not None:
        query = query.where(UsageRecord.key_id == filters.key_id if filters.key_id else UsageRecord.key_id.is_(None))
    if filters.endpoint:
        query = query.where(UsageRecord.endpoint == filters.endpoint)
    if filters.since:
        query = query.where(UsageRecord.started_at >= filters.since)
    if filters.until:
        query = query.where(UsageRecord.started_at < filters.until)
    if low is not None:
        query = query.where(UsageRecord.id >= low)
    if high is not None:
        query = query.where(UsageRecord.id <= high)
    return query


def list_usage(
    session: Session,
    account_id: int,
    limit: int = 20,
    before: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    model: str | None = None,
    after: int | None = None,
    key_id: int | None = None,
    endpoint: str | None = None,
) -> dict:
    """One page, newest first. ``before`` (a page's ``next_cursor``) pages to older requests,
    ``after`` (a page's ``prev_cursor``) to newer ones; ``has_more`` says older ones exist."""
    # In UTC, as stored (SQLite would compare a zoned timestamp by its local digits).
    since, until = (_aware(moment) if moment else None for moment in (since, until))
    filters = Filters(model, key_id, endpoint, since, until)
    page = {"object": "list", "data": [], "has_more": False, "next_cursor": None, "prev_cursor": None}
    ids = _id_range(session, account_id, filters)
    if ids is None:
        return page
    low, high = ids

    def first(lo: int | None, hi: int | None, newest: bool, count: int) -> list:
        order = UsageRecord.id.desc() if newest else UsageRecord.id
        query = _records([UsageRecord], account_id, filters, _tighter(low, lo, max), _tighter(high, hi, min))
        return list(session.scalars(query.order_by(order).limit(count)))

    if after is not None:
        rows = first(after + 1, None, False, limit + 1)
        newer = len(rows) > limit
        rows = list(reversed(rows[:limit]))
        older = bool(rows) and bool(first(None, rows[-1].id - 1, True, 1))
    else:
        rows = first(None, before - 1 if before else None, True, limit + 1)
        older = len(rows) > limit
        rows = rows[:limit]
        newer = bool(before) and bool(first(rows[0].id + 1 if rows else before, None, False, 1))
    page["data"] = [receipt(row) for row in rows]
    page["has_more"] = older
    page["next_cursor"] = rows[-1].id if older else None
    if newer:
        page["prev_cursor"] = rows[0].id if rows else before - 1
    return page


CSV_HEADER = (
    "time",
    "request_id",
    "model",
    "endpoint",
    "key_id",
    "status",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "credits",
    "charged_ucr",
    "estimated",
)


def csv_rows(session: Session, account_id: int, filters: Filters, batch: int = 2000) -> Iterator[tuple]:
    """Every matching record as a CSV row (``CSV_HEADER``), newest first, read ``batch`` at a time by id.

    Credits are exact: six decimal places are all the micro-credits there are.
    """
    yield CSV_HEADER
    ids = _id_range(session, account_id, filters)
    if ids is None:
        return
    columns = [
        UsageRecord.id,
        UsageRecord.started_at,
        UsageRecord.request_id,
        UsageRecord.model,
        UsageRecord.endpoint,
        UsageRecord.key_id,
        UsageRecord.status,
        UsageRecord.input_tokens,
        UsageRecord.cached_input_tokens,
        UsageRecord.output_tokens,
        UsageRecord.charged_ucr,
        UsageRecord.estimated,
    ]
    low, high = ids
    while True:
        query = _records(columns, account_id, filters, low, high).order_by(UsageRecord.id.desc()).limit(batch)
        rows = session.execute(query).all()
        for row in rows:
            record_id, started, request_id, model, endpoint, key, status, tin, tcached, tout, charged, est = row
            yield (
                _utc(started),
                request_id,
                model,
                endpoint,
                key if key is not None else "",
                status,
                tin,
                tcached,
                tout,
                format_credits(charged),
                charged,
                "yes" if est else "no",
            )
        if len(rows) < batch:
            return
        high = rows[-1][0] - 1
