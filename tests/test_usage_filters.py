"""Usage filters (period, model, key, endpoint) on the dashboard's charts, totals, table and CSV and on
``GET /v1/usage``; paging both ways; the CSV past 10,000 rows; roll-ups that match the records; the
indexes the list queries use.

Records are stored with ``usage.store_records`` (what the ledger's drain calls) in batches, which is
fast enough for tens of thousands of rows; a few requests go through the real API and drain as well.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import event, select

from broker import accounts, keys, usage
from broker.models import UsageDaily, UsageRecord
from tests.conftest import DB_BACKENDS
from tests.test_dashboard import member  # noqa: F401  (a logged-in account: fixture)

MODELS = ("demo/chat", "openai/gpt-4o-mini", "anthropic/claude-haiku")
ENDPOINTS = ("chat", "tts", "image")


def _record(account_id: int, key_id: int | None, model: str, endpoint: str, started: datetime, charged: int) -> dict:
    return {
        "request_id": f"req_{uuid.uuid4().hex}",
        "account_id": account_id,
        "key_id": key_id,
        "endpoint": endpoint,
        "provider": model.partition("/")[0],
        "model": model,
        "status": "ok",
        "charged_ucr": charged,
        "started_at": started,
        "finished_at": started + timedelta(seconds=1),
    }


def store(app, rows: list[dict], batch: int = 5000) -> None:
    session = app.extensions["broker"].db()
    for start in range(0, len(rows), batch):
        usage.store_records(session, rows[start : start + batch])
        session.commit()


def second_key(app, tenant) -> int:
    session = app.extensions["broker"].db()
    row, _ = keys.create_key(session, accounts.get_by_email(session, tenant.email), "second")
    return row.id


def varied(account_id: int, key_ids: list[int], count: int, now: datetime) -> list[dict]:
    """``count`` records cycling through keys, models, endpoints and ages (0 to 40 days), charges from 1 ucr."""
    return [
        _record(
            account_id,
            key_ids[i % len(key_ids)],
            MODELS[i % 3],
            ENDPOINTS[(i // 3) % 3],
            now - timedelta(days=(i * 7) % 41, minutes=i % 50),
            1 + (i * 7919) % 1_000_003,
        )
        for i in range(count)
    ]


@pytest.fixture
def filled(app, member):  # noqa: F811
    """The member with two keys and 600 varied records (plus one without a key)."""
    tenant, _ = member
    key_ids = [tenant.key_id, second_key(app, tenant)]
    now = datetime.now(UTC).replace(microsecond=0)
    rows = varied(tenant.account_id, key_ids, 600, now)
    rows.append(_record(tenant.account_id, None, "demo/chat", "chat", now - timedelta(hours=1), 5))
    store(app, rows, batch=97)
    return tenant, key_ids, rows, now


def _matching(rows, now, days, model=None, key_id=None, endpoint=None) -> list[dict]:
    since = datetime.combine(now.date() - timedelta(days=days - 1), datetime.min.time(), tzinfo=UTC)
    return [
        r
        for r in rows
        if r["started_at"] >= since
        and (model is None or r["model"] == model)
        and (key_id is None or (r["key_id"] or 0) == key_id)
        and (endpoint is None or r["endpoint"] == endpoint)
    ]


def _csv(client, query: str) -> list[dict]:
    response = client.get(f"/dashboard/usage.csv?{query}")
    assert response.status_code == 200 and response.is_streamed
    return list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))


def _page_ids(html: str) -> list[str]:
    return re.findall(r"/dashboard/requests/(req_[0-9a-f]+)", html)


@pytest.mark.parametrize(
    "days,model,key_index,endpoint",
    [(7, None, None, None), (30, "openai/gpt-4o-mini", None, None), (30, None, 1, "tts"), (90, "demo/chat", 0, "chat")],
)
def test_filters_apply_to_totals_charts_table_and_csv_alike(client, filled, days, model, key_index, endpoint):
    tenant, key_ids, rows, now = filled
    key_id = key_ids[key_index] if key_index is not None else None
    expected = _matching(rows, now, days, model, key_id, endpoint)
    assert expected, "the case must select something"
    query = f"days={days}" + "".join(
        f"&{name}={value}" for name, value in (("model", model), ("key", key_id), ("endpoint", endpoint)) if value
    )

    html = client.get(f"/dashboard/usage?{query}").get_data(as_text=True)
    total = sum(r["charged_ucr"] for r in expected)
    assert f"<strong>{usage.format_credits(total)}</strong> credits over {len(expected)} requests" in html
    # Spend per key: one line per key among the matches, with its exact spend.
    by_key = defaultdict(int)
    for r in expected:
        by_key[r["key_id"] or 0] += r["charged_ucr"]
    shown = re.findall(r'data-testid="key-credits">([0-9.]+)<', html)
    assert sorted(shown) == sorted(usage.format_credits(v) for v in by_key.values())
    # Charts: a bar per (day, model) among the matches only, and the day's credits add up.
    bars = re.findall(r"<title>(\d{4}-\d\d-\d\d): (\S+) ([0-9.e+-]+) credits</title>", html)
    assert {(day, m) for day, m, _ in bars} == {(r["started_at"].date().isoformat(), r["model"]) for r in expected}
    # Table: the newest matches, newest first.
    newest = sorted(expected, key=lambda r: r["started_at"], reverse=True)
    page = _page_ids(html)
    assert len(page) == min(20, len(expected)) and set(page) <= {r["request_id"] for r in expected}
    # CSV: exactly the matches, with exact credits.
    exported = _csv(client, query)
    assert {row["request_id"] for row in exported} == {r["request_id"] for r in newest}
    charged = {r["request_id"]: r["charged_ucr"] for r in expected}
    assert all(int(row["charged_ucr"]) == charged[row["request_id"]] for row in exported)
    assert all(row["credits"] == usage.format_credits(charged[row["request_id"]]) for row in exported)


def test_the_table_pages_older_and_newer_with_the_filters_kept(client, filled):
    tenant, key_ids, rows, now = filled
    expected = _matching(rows, now, 30, model="demo/chat")
    expected_ids = [r["request_id"] for r in sorted(expected, key=lambda r: -_id(client, r))]
    html = client.get("/dashboard/usage?days=30&model=demo/chat").get_data(as_text=True)
    seen, pages = [], []
    while True:
        pages.append(_page_ids(html))
        seen += pages[-1]
        older = re.search(
            r'<a href="([^"]+)" hx-get="[^"]+" hx-target="#usage-table" hx-swap="outerHTML" rel="next"', html
        )
        if not older:
            break
        url = older.group(1).replace("&amp;", "&")
        assert "model=demo/chat" in url.replace("%2F", "/") and "days=30" in url
        html = client.get(url, headers={"HX-Request": "true", "HX-Target": "usage-table"}).get_data(as_text=True)
    assert seen == expected_ids and len(pages) > 2
    assert 'rel="prev"' in html  # the last page leads back
    back = []
    while newer := re.search(
        r'<a href="([^"]+)" hx-get="[^"]+" hx-target="#usage-table" hx-swap="outerHTML" rel="prev"', html
    ):
        html = client.get(
            newer.group(1).replace("&amp;", "&"), headers={"HX-Request": "true", "HX-Target": "usage-table"}
        ).get_data(as_text=True)
        back.append(_page_ids(html))
    assert back == list(reversed(pages[:-1]))


def _id(client, record: dict) -> int:
    session = client.application.extensions["broker"].db()
    return session.scalar(select(UsageRecord.id).where(UsageRecord.request_id == record["request_id"]))


@pytest.mark.parametrize("db_backend", DB_BACKENDS, indirect=True)
def test_v1_usage_filters_and_pages_both_ways(client, filled):
    tenant, key_ids, rows, now = filled
    since = (now - timedelta(days=20)).isoformat()
    query = f"from={since}&endpoint=chat&key_id={key_ids[1]}".replace("+", "%2B")
    expected = [
        r
        for r in rows
        if r["started_at"] >= now - timedelta(days=20) and r["endpoint"] == "chat" and r["key_id"] == key_ids[1]
    ]
    first = client.get(f"/v1/usage?limit=7&{query}", headers=tenant.headers).json
    assert first["prev_cursor"] is None and first["has_more"]
    pages, page = [first], first
    while page["next_cursor"]:
        page = client.get(f"/v1/usage?limit=7&{query}&cursor={page['next_cursor']}", headers=tenant.headers).json
        pages.append(page)
    ids = [item["id"] for p in pages for item in p["data"]]
    assert sorted(ids) == sorted(r["request_id"] for r in expected) and len(ids) == len(set(ids))
    assert all(item["endpoint"] == "chat" for p in pages for item in p["data"])
    # And back: each prev_cursor gives the page before, the same rows in the same order.
    back = []
    while page["prev_cursor"]:
        page = client.get(f"/v1/usage?limit=7&{query}&after={page['prev_cursor']}", headers=tenant.headers).json
        back.append([item["id"] for item in page["data"]])
    assert back == [[item["id"] for item in p["data"]] for p in reversed(pages[:-1])]
    # A period in the past with a model filter; `to` excludes, `from` includes (any zone).
    start, until = now - timedelta(days=15), now - timedelta(days=10)
    window = f"from={start.astimezone(timezone(timedelta(hours=2))).isoformat()}&to={until.isoformat()}"
    old = client.get(f"/v1/usage?limit=100&model=demo/chat&{window}".replace("+", "%2B"), headers=tenant.headers).json
    expected_old = {r["request_id"] for r in rows if r["model"] == "demo/chat" and start <= r["started_at"] < until}
    assert {item["id"] for item in old["data"]} == expected_old and 0 < len(expected_old) < 100
    assert client.get("/v1/usage?key_id=-1", headers=tenant.headers).json["error"]["param"] == "key_id"


def test_the_csv_holds_every_request_of_the_period_past_10000(app, client, member):  # noqa: F811
    tenant, _ = member
    now = datetime.now(UTC)
    rows = [
        _record(tenant.account_id, tenant.key_id, MODELS[i % 2], "chat", now - timedelta(seconds=i), 1 + i)
        for i in range(12_345)
    ]
    rows.append(_record(tenant.account_id, tenant.key_id, "demo/chat", "chat", now - timedelta(days=8), 7))
    store(app, rows)
    exported = _csv(client, "days=7")
    assert len(exported) == 12_345
    assert exported[0]["charged_ucr"] == "12345" and exported[-1]["credits"] == "0.000001"  # newest first, exact
    assert len({row["request_id"] for row in exported}) == 12_345
    assert len(_csv(client, "days=30")) == 12_346
    assert len(_csv(client, "days=7&model=demo/chat")) == 6173


@pytest.mark.parametrize("db_backend", DB_BACKENDS, indirect=True)
def test_rollups_by_key_and_endpoint_match_the_records_to_the_microcredit(app, client, member):  # noqa: F811
    tenant, _ = member
    key_ids = [tenant.key_id, second_key(app, tenant)]
    now = datetime.now(UTC)
    rows = varied(tenant.account_id, key_ids, 3000, now)
    store(app, rows, batch=251)
    store(app, rows[:500], batch=77)  # replays: stored once, counted once
    for _ in range(3):  # and through the real API, the ledger and its drain
        call = client.post(
            "/v1/chat/completions",
            json={"model": "demo/chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5},
            headers=tenant.headers,
        )
        assert call.status_code == 200
    assert client.get("/dashboard/usage").status_code == 200  # drains

    session = app.extensions["broker"].db()
    records = session.execute(
        select(
            UsageRecord.id,
            UsageRecord.started_at,
            UsageRecord.model,
            UsageRecord.key_id,
            UsageRecord.endpoint,
            UsageRecord.charged_ucr,
        ).where(UsageRecord.account_id == tenant.account_id)
    ).all()
    assert len(records) == 3003
    want = defaultdict(lambda: [0, 0, None, None])
    for record_id, started, model, key_id, endpoint, charged in records:
        day = (started.astimezone(UTC) if started.tzinfo else started).date()  # the UTC day
        bucket = want[(day, model, key_id or 0, endpoint)]
        bucket[0] += 1
        bucket[1] += charged
        bucket[2] = min(bucket[2] or record_id, record_id)
        bucket[3] = max(bucket[3] or record_id, record_id)

    def rollups() -> dict:
        found = session.execute(
            select(UsageDaily)
            .where(UsageDaily.account_id == tenant.account_id)
            .execution_options(populate_existing=True)
        ).scalars()
        return {
            (r.day, r.model, r.key_id, r.endpoint): [r.requests, r.charged_ucr, r.first_id, r.last_id] for r in found
        }

    assert rollups() == dict(want)
    usage.rollup_days(session, days=45)  # the cron's recount changes nothing
    assert rollups() == dict(want)
    by_key = usage.totals_by(session, tenant.account_id, usage.Filters(), "key_id")
    assert sum(row["charged_ucr"] for row in by_key) == sum(r[5] for r in records)


def test_each_list_query_reads_the_index_that_matches_it(app, filled):
    tenant, key_ids, rows, now = filled
    engine = app.extensions["broker"].db().get_bind()
    seen: list[tuple[str, tuple]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "FROM usage_records" in statement and statement.lstrip().startswith("SELECT usage_records"):
            seen.append((statement, parameters))

    session = app.extensions["broker"].db()
    since = now - timedelta(days=6)
    cases = {
        "ix_usage_account_id": {},
        "ix_usage_account_model_id": {"model": "demo/chat"},
        "ix_usage_account_key_id": {"key_id": key_ids[0]},
        "ix_usage_account_endpoint_id": {"endpoint": "tts"},
    }
    for index, filters in cases.items():
        for extra in ({}, {"since": since}, {"before": 400}, {"after": 100, "since": since}):
            seen.clear()
            event.listen(engine, "before_cursor_execute", capture)
            try:
                usage.list_usage(session, tenant.account_id, **filters, **extra)
            finally:
                event.remove(engine, "before_cursor_execute", capture)
            assert seen, (index, extra)
            for statement, parameters in seen:  # the page, and the look for a page beyond it
                plan = " | ".join(
                    row[-1]
                    for row in session.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
                )
                assert index in plan and "TEMP B-TREE" not in plan, (index, extra, plan)


# -- in a real browser -------------------------------------------------------------------------


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_usage_page_in_a_browser_filters_pages_and_its_chart_text_is_readable(live_server, app, viewport):
    from tests.browser_support import DESKTOP, PHONE, axe_violations, chromium, new_page, shot
    from tests.test_browser_dashboard import customer, log_in, no_sideways_scroll

    tenant = customer(app)
    now = datetime.now(UTC)
    store(app, varied(tenant.account_id, [tenant.key_id], 150, now))
    with chromium() as browser:
        page, watch = new_page(browser, DESKTOP if viewport == "desktop" else PHONE)
        log_in(page, live_server, tenant)
        page.goto(live_server + "/dashboard/usage?days=30")
        sizes = page.eval_on_selector_all(
            "svg [data-testid=chart-text]", "els => els.map(e => e.getBoundingClientRect().height)"
        )
        fonts = page.eval_on_selector_all(
            "svg [data-testid=chart-text]", "els => els.map(e => parseFloat(getComputedStyle(e).fontSize))"
        )
        assert len(sizes) >= 4 and min(fonts) >= 11 and min(sizes) >= 11, (fonts, sizes)
        assert no_sideways_scroll(page)
        shot(page, f"usage-{viewport}")

        page.select_option("#model", "openai/gpt-4o-mini")
        page.click("#usage button[type=submit]")
        page.wait_for_url("**model=openai%2Fgpt-4o-mini**")
        models = page.locator("#usage-table tbody tr td:nth-child(2)").all_inner_texts()
        assert models and set(models) == {"openai/gpt-4o-mini"}
        first = page.locator("#usage-table tbody tr").first.inner_text()
        page.click("text=Older requests")
        page.wait_for_selector("text=Newer requests")
        assert set(page.locator("#usage-table tbody tr td:nth-child(2)").all_inner_texts()) == {"openai/gpt-4o-mini"}
        page.click("text=Newer requests")
        page.locator("text=Newer requests").wait_for(state="detached")
        assert page.locator("#usage-table tbody tr").first.inner_text() == first
        assert (
            page.locator("a[data-testid=csv-link]").get_attribute("href").endswith("days=30&model=openai%2Fgpt-4o-mini")
        )
        assert axe_violations(page) == []
        watch.assert_clean(page)
