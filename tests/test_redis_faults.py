"""Redis killed with SIGKILL and restarted under load (AOF on): no purchase lost, no double credit, 503 meanwhile."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import requests
from sqlalchemy import func, select
from werkzeug.serving import make_server

from broker import create_app
from broker.embedded_redis import EmbeddedRedis
from broker.models import LedgerEntry, UsageRecord
from tests.conftest import CURRENT, assert_invariant, make_tenant

pytestmark = pytest.mark.slow

CHAT = {"model": "demo/chat", "messages": [{"role": "user", "content": "load"}], "max_tokens": 20}


@pytest.fixture
def durable_app(app, tmp_path):
    """The test app's database, on its own Redis with AOF (fsync every second), served over HTTP."""
    server = EmbeddedRedis(tmp_path / "aof-redis", appendonly=True).start()
    durable = create_app({**app.config["BROKER_TEST_CONFIG"], "REDIS_URL": server.url})
    CURRENT["app"] = durable
    http = make_server("127.0.0.1", 0, durable, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield durable, server, f"http://127.0.0.1:{http.server_port}"
    http.shutdown()
    server.stop()
    durable.extensions["broker"].engine.dispose()


def test_redis_kill_and_restart_under_load_loses_no_purchase_and_doubles_nothing(durable_app):
    app, server, url = durable_app
    svc = app.extensions["broker"]
    tenants = [make_tenant("50") for _ in range(3)]
    stop = threading.Event()
    statuses: list[int] = []
    granted: list[tuple[int, str]] = []

    def chat_load(tenant) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    statuses.append(
                        session.post(
                            f"{url}/v1/chat/completions", json=CHAT, headers=tenant.headers, timeout=10
                        ).status_code
                    )
                except requests.RequestException:
                    statuses.append(0)

    def purchases(tenant) -> None:
        # The purchase path: SQL first, then Redis. Retried on failure, as Stripe retries webhooks.
        while not stop.is_set():
            grant_id = f"purchase-{uuid.uuid4().hex}"
            for _ in range(50):
                try:
                    with app.app_context():
                        svc.ledger.grant(svc.db(), tenant.account_id, 1_000_000, grant_id, "load purchase")
                        svc.db.remove()
                    granted.append((tenant.account_id, grant_id))
                    break
                except Exception:
                    svc.db.remove()
                    time.sleep(0.1)
            time.sleep(0.05)

    threads = [threading.Thread(target=chat_load, args=(t,)) for t in tenants]
    threads += [threading.Thread(target=purchases, args=(t,)) for t in tenants]
    for thread in threads:
        thread.start()
    time.sleep(2)
    server.kill()
    time.sleep(1)
    down_statuses = len(statuses)
    time.sleep(1)
    assert 503 in statuses[down_statuses:] or 0 in statuses[down_statuses:]
    server.start()
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join(30)

    assert 200 in statuses and 503 in statuses
    # Requests in flight when Redis died could not settle: their holds wait for the reaper.
    svc.ledger.reap_expired(now=time.time() + 10**6)
    repaired = app.test_cli_runner().invoke(args=["broker", "reconcile", "--repair"])
    assert repaired.exit_code == 0, repaired.output
    session = svc.db()
    session.expire_all()
    # No purchase lost: every grant the purchase path acknowledged is in the SQL ledger once.
    in_sql = set(session.scalars(select(LedgerEntry.entry_id).where(LedgerEntry.kind == "grant")))
    assert {f"grant:{grant_id}" for _, grant_id in granted} <= in_sql
    # No double credit: each balance is exactly its SQL ledger total (all holds have ended).
    for tenant in tenants:
        total = session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.total_delta), 0)).where(
                LedgerEntry.account_id == tenant.account_id
            )
        )
        assert svc.ledger.balance(tenant.account_id) == total >= 0
    # Nothing was charged for a request refused with 503.
    charged_rows = session.scalar(select(func.count()).where(UsageRecord.charged_ucr > 0))
    assert charged_rows <= statuses.count(200)
    assert_invariant(app)
