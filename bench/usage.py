"""Usage pages on a big account: p50/p95 of the overview queries, ``GET /v1/usage`` and the dashboard's
Usage page (with and without filters), and the CSV export's streaming rate.

Fills one account with N usage records (default 500,000) directly in SQL, spread over 90 days, three
keys, eight models (one rare) and four endpoints, beside a second account with a tenth as many;
the roll-ups are computed as migration 0008 does. Then it calls the app in-process (Flask's test
client, an embedded Redis), so the figures are server time without the network.

    .venv/bin/python bench/usage.py                       # SQLite, 500,000 records
    .venv/bin/python bench/usage.py --records 5000000     # the target: every list page <= 200 ms p95
    .venv/bin/python bench/usage.py --database-url postgresql+psycopg://broker:broker@127.0.0.1/bench_usage

A PostgreSQL database is emptied and migrated first. ``--keep DIR`` keeps the SQLite file there and
reuses it on the next run with the same ``--records``.
"""

from __future__ import annotations

import argparse
import random
import re
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402

TARGET_P95_MS = 200.0
DAYS = 90
MODELS = (  # (model, share)
    ("openai/gpt-4o-mini", 0.40),
    ("anthropic/claude-haiku-4-5", 0.20),
    ("openai/gpt-4o", 0.15),
    ("google/gemini-2.5-flash", 0.10),
    ("elevenlabs/eleven_multilingual_v2", 0.07),
    ("openai/gpt-image-1", 0.05),
    ("suno/v4", 0.028),
    ("demo/chat", 0.002),  # the rare one: a sparse filter
)
ENDPOINT_OF = {"elevenlabs": "tts", "suno": "music", "openai/gpt-image-1": "image"}
KEY_SHARES = (0.5, 0.35, 0.15)
COLUMNS = (
    "request_id, account_id, key_id, endpoint, provider, model, status, stream, input_tokens, cached_input_tokens, "
    "cache_write_tokens, cache_write_1h_tokens, output_tokens, cost_usd, markup, charged_ucr, hold_ucr, estimated, "
    "capped, started_at, finished_at"
)
EMAIL = "bench-usage@example.com"
PASSWORD = "bench usage password"


def _endpoint(model: str) -> str:
    return ENDPOINT_OF.get(model) or ENDPOINT_OF.get(model.partition("/")[0]) or "chat"


def _rows(account_id: int, key_ids: list[int], count: int, start: datetime, seed: int):
    """``count`` records in time order over DAYS days (ids then follow time, as in production)."""
    rng = random.Random(seed)
    models = [m for m, _ in MODELS]
    weights = [w for _, w in MODELS]
    step = DAYS * 86400 / count
    for i in range(count):
        model = rng.choices(models, weights)[0]
        started = start + timedelta(seconds=i * step + rng.random() * step)
        tokens_in, tokens_out = rng.randint(10, 4000), rng.randint(1, 1000)
        yield (
            f"req_{account_id}_{i:09d}_{seed}",
            account_id,
            rng.choices(key_ids, KEY_SHARES[: len(key_ids)])[0],
            _endpoint(model),
            model.partition("/")[0],
            model,
            "ok",
            False,
            tokens_in,
            0,
            0,
            0,
            tokens_out,
            "0.001",
            "1.8",
            rng.randint(1, 50_000),
            0,
            False,
            False,
            started,
            started + timedelta(seconds=2),
        )


def _interleaved(big: tuple, small: tuple, count: int, start: datetime):
    """The big account's records with the small one's mixed in by time."""
    small_count = count // 10
    big_rows = _rows(*big, count, start, 1)
    small_rows = _rows(*small, small_count, start, 2)
    ratio = max(count // max(small_count, 1), 1)
    for i, row in enumerate(big_rows):
        yield row
        if i % ratio == 0:
            extra = next(small_rows, None)
            if extra:
                yield extra


def fill(engine, big: tuple, small: tuple, count: int) -> None:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=DAYS - 1)
    rows = _interleaved(big, small, count, start)
    began = time.perf_counter()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        if engine.dialect.name == "sqlite":
            placeholders = ", ".join("?" * len(COLUMNS.split(",")))
            statement = f"INSERT INTO usage_records ({COLUMNS}) VALUES ({placeholders})"
            while batch := [next(rows, None) for _ in range(50_000)]:
                batch = [(*r[:19], r[19].isoformat(" "), r[20].isoformat(" ")) for r in batch if r]
                if not batch:
                    break
                cursor.executemany(statement, batch)
        else:
            with cursor.copy(f"COPY usage_records ({COLUMNS}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        raw.commit()
    finally:
        raw.close()
    print(f"  records stored in {time.perf_counter() - began:.1f} s")
    began = time.perf_counter()
    day = "date(started_at)" if engine.dialect.name == "sqlite" else "CAST(started_at AT TIME ZONE 'UTC' AS DATE)"
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM usage_daily"))
        connection.execute(
            text(
                "INSERT INTO usage_daily "
                "(account_id, day, model, key_id, endpoint, requests, charged_ucr, first_id, last_id) "
                f"SELECT account_id, {day}, model, COALESCE(key_id, 0), endpoint, "
                "COUNT(*), COALESCE(SUM(charged_ucr), 0), MIN(id), MAX(id) "
                f"FROM usage_records GROUP BY account_id, {day}, model, COALESCE(key_id, 0), endpoint"
            )
        )
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))  # what autovacuum would have done by then
    print(f"  roll-ups computed in {time.perf_counter() - began:.1f} s")


def timed(name: str, call: Callable[[], object], repeat: int, results: list) -> None:
    call()  # warm
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        call()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    p50 = statistics.median(samples)
    p95 = samples[min(len(samples) - 1, int(round(0.95 * (len(samples) - 1))))]
    flag = "" if p95 <= TARGET_P95_MS else "  ABOVE TARGET"
    results.append((name, p50, p95))
    print(f"  {name:<52} p50 {p50:8.1f} ms   p95 {p95:8.1f} ms{flag}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--keep", default="", help="directory to keep (and reuse) the SQLite database in")
    args = parser.parse_args()

    from werkzeug.security import generate_password_hash

    from broker import accounts, create_app, keys, migrations, usage
    from broker.embedded_redis import EmbeddedRedis

    work = Path(tempfile.mkdtemp(prefix="bench-usage-"))
    db_url = args.database_url
    reuse = False
    if not db_url:
        where = Path(args.keep) if args.keep else work
        where.mkdir(parents=True, exist_ok=True)
        path = where / f"usage-{args.records}.db"
        reuse = path.exists()
        db_url = f"sqlite:///{path}"
    else:
        engine = create_engine(db_url)
        with engine.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE"))
            connection.execute(text("CREATE SCHEMA public"))
        engine.dispose()
    migrations.upgrade(db_url)
    redis_server = EmbeddedRedis(work / "redis", appendonly=False).start()
    try:
        app = create_app(
            {
                "BROKER_ENV": "testing",
                "SECRET_KEY": secrets.token_urlsafe(32),
                "INSTANCE_PATH": str(work / "instance"),
                "DATABASE_URL": db_url,
                "REDIS_URL": redis_server.url,
                "DEMO_PROVIDER": True,
                "RATE_LIMIT_PER_MINUTE": 10_000_000,
                "RATE_LIMIT_PER_DAY": 10_000_000,
                "MAIL_URL": "",  # mail goes to files under INSTANCE_PATH (none is sent)
            }
        )
        with app.app_context():
            svc = app.extensions["broker"]
            session = svc.db()
            engine = session.get_bind()
            print(f"database: {engine.dialect.name}, {args.records:,} records for the big account")
            if reuse:
                account = accounts.get_by_email(session, EMAIL)
                key_ids = sorted(k for k in usage.choices(session, account.id)["key_ids"])
            else:
                account = accounts.create_account(session, EMAIL, verified=True)
                other = accounts.create_account(session, "bench-usage-other@example.com", verified=True)
                key_ids = [keys.create_key(session, account, f"key {n}")[0].id for n in range(3)]
                other_key = keys.create_key(session, other, "other")[0].id
                fill(engine, (account.id, key_ids), (other.id, [other_key]), args.records)
            account.password_hash = generate_password_hash(PASSWORD)
            session.commit()
            _, plain = keys.create_key(session, account, "bench", max_active=1000)
            account_id = account.id
            ids = session.execute(
                text("SELECT MIN(id), MAX(id), COUNT(*) FROM usage_records WHERE account_id = :a"), {"a": account_id}
            ).one()
            print(f"  account {account_id}: {ids[2]:,} records, ids {ids[0]}..{ids[1]}")
            middle = session.scalar(
                text("SELECT id FROM usage_records WHERE account_id = :a ORDER BY id LIMIT 1 OFFSET :n"),
                {"a": account_id, "n": ids[2] // 2},
            )
            svc.db.remove()

        api = app.test_client()
        headers = {"Authorization": f"Bearer {plain}"}
        web = app.test_client()
        token = re.search(r'name="csrf_token" (?:type="hidden" )?value="([^"]+)"', web.get("/login").text).group(1)
        login = web.post("/login", data={"email": EMAIL, "password": PASSWORD, "csrf_token": token})
        assert login.status_code == 302, login.status_code

        def get(client, url: str, **kwargs) -> Callable[[], object]:
            def call() -> None:
                response = client.get(url, **kwargs)
                assert response.status_code == 200, (url, response.status_code, response.text[:300])

            return call

        def overview_queries() -> None:
            with app.app_context():
                session = app.extensions["broker"].db()
                now = datetime.now(UTC)
                usage.spent_since(session, account_id, now.replace(hour=0, minute=0, second=0, microsecond=0))
                usage.spent_since(session, account_id, now.replace(day=1, hour=0, minute=0, second=0, microsecond=0))
                usage.list_usage(session, account_id, limit=5)
                app.extensions["broker"].db.remove()

        month_ago = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%S")
        weeks_ago = (datetime.now(UTC) - timedelta(days=20)).strftime("%Y-%m-%dT%H:%M:%S")
        cases = [
            ("overview queries (today, month, 5 latest)", overview_queries),
            ("GET /dashboard/ (overview page)", get(web, "/dashboard/")),
            ("GET /v1/usage (first page)", get(api, "/v1/usage", headers=headers)),
            ("GET /v1/usage?model=openai/gpt-4o", get(api, "/v1/usage?model=openai/gpt-4o", headers=headers)),
            ("GET /v1/usage?model=demo/chat (0.2 %)", get(api, "/v1/usage?model=demo/chat", headers=headers)),
            ("GET /v1/usage?cursor=<middle> (a later page)", get(api, f"/v1/usage?cursor={middle}", headers=headers)),
            ("GET /v1/usage?after=<middle> (a newer page)", get(api, f"/v1/usage?after={middle}", headers=headers)),
            (
                "GET /v1/usage?key_id=…&endpoint=tts",
                get(api, f"/v1/usage?key_id={key_ids[-1]}&endpoint=tts", headers=headers),
            ),
            (
                "GET /v1/usage?model=demo/chat&from=-30d&to=-20d",
                get(api, f"/v1/usage?model=demo/chat&from={month_ago}&to={weeks_ago}", headers=headers),
            ),
            ("GET /dashboard/usage (7 days)", get(web, "/dashboard/usage")),
            ("GET /dashboard/usage?days=90", get(web, "/dashboard/usage?days=90")),
            (
                "GET /dashboard/usage?days=30&model=openai/gpt-4o",
                get(web, "/dashboard/usage?days=30&model=openai/gpt-4o"),
            ),
            ("GET /dashboard/usage?days=90&model=demo/chat", get(web, "/dashboard/usage?days=90&model=demo/chat")),
            (
                "GET /dashboard/usage?days=30&key=…&endpoint=image",
                get(web, f"/dashboard/usage?days=30&key={key_ids[-1]}&endpoint=image"),
            ),
            (
                "GET /dashboard/usage (older page, table only)",
                get(
                    web,
                    f"/dashboard/usage?days=90&cursor={middle}",
                    headers={"HX-Request": "true", "HX-Target": "usage-table"},
                ),
            ),
        ]
        print(f"p50/p95 over {args.repeat} calls (target: p95 <= {TARGET_P95_MS:.0f} ms):")
        results: list = []
        for name, call in cases:
            timed(name, call, args.repeat, results)

        for query in ("days=30", "days=90&model=openai/gpt-4o"):
            began = time.perf_counter()
            response = web.get(f"/dashboard/usage.csv?{query}", buffered=False)
            first, rows, size = None, 0, 0
            for chunk in response.response:
                first = first or time.perf_counter() - began
                size += len(chunk)
                rows += chunk.count(b"\n") if isinstance(chunk, bytes) else chunk.count("\n")
            response.close()
            seconds = time.perf_counter() - began
            print(
                f"  CSV {query:<30} {rows - 1:>9,} rows, {size / 1e6:6.1f} MB in {seconds:5.2f} s: "
                f"{(rows - 1) / seconds:,.0f} rows/s, first bytes after {first * 1000:.0f} ms"
            )
        worst = max(p95 for _, _, p95 in results)
        print(f"worst p95: {worst:.1f} ms ({'within' if worst <= TARGET_P95_MS else 'above'} the target)")
        return 0
    finally:
        redis_server.stop()


if __name__ == "__main__":
    sys.exit(main())
