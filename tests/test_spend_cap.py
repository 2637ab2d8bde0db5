"""The daily spend cap of a key holds under concurrency and counts every kind (issue 10 item 11).

Each hold reserves its amount on the key's spend of the day (a counter in the account's
``{acct:ID}`` slot, inside the hold script) and its end replaces the reservation with the charge,
so concurrent calls cannot spend past the cap, and media jobs count like chat.
"""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import requests
from sqlalchemy import func, select

from broker import ledger as ledger_module
from broker.models import UsageRecord
from tests.conftest import assert_invariant, make_tenant

CAP_CREDITS = Decimal("0.2")
CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}


def limit(runner, tenant, credits: Decimal) -> None:
    result = runner.invoke(args=["broker", "limit-key", str(tenant.key_id), "--credits-per-day", str(credits)])
    assert result.exit_code == 0, result.output


def charged_today(app, tenant) -> int:
    svc = app.extensions["broker"]
    session = svc.db()
    svc.ledger.drain(session, [tenant.account_id])
    total = session.scalar(
        select(func.coalesce(func.sum(UsageRecord.charged_ucr), 0)).where(UsageRecord.account_id == tenant.account_id)
    )
    return int(total)


def test_concurrent_calls_never_spend_past_the_cap(app, runner, live_server, upstream):
    """Forty calls at once against a cap a few of them fill: the day's charges stay within it."""
    tenant = make_tenant("100")
    limit(runner, tenant, CAP_CREDITS)
    barrier, statuses = threading.Barrier(40), []

    def call() -> None:
        barrier.wait()
        answer = requests.post(f"{live_server}/v1/chat/completions", json=CHAT, headers=tenant.headers, timeout=30)
        statuses.append((answer.status_code, answer.json().get("error", {}).get("code")))

    threads = [threading.Thread(target=call) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {status for status, _ in statuses} <= {200, 429}
    assert {code for status, code in statuses if status == 429} == {"spend_cap_reached"}
    assert any(status == 200 for status, _ in statuses) and any(status == 429 for status, _ in statuses)
    assert 0 < charged_today(app, tenant) <= CAP_CREDITS * 1_000_000
    # Nothing is left reserved once every call has ended: the counter is exactly what was charged.
    svc = app.extensions["broker"]
    spent = svc.redis.get(ledger_module.spend_key(tenant.account_id, tenant.key_id, time.time()))
    assert int(spent) == charged_today(app, tenant)
    assert_invariant(app)


def test_a_media_job_counts_against_the_cap(app, client, runner, tenant, upstream):
    """A job's hold is reserved on the cap like a chat's: one the rest of the day's cap cannot hold is refused."""
    limit(runner, tenant, Decimal("0.5"))
    before = app.extensions["broker"].ledger.balance(tenant.account_id)
    answer = client.post(
        "/v1/image",
        json={"model": "openai/gpt-image-1", "prompt": "a lighthouse", "size": "1024x1024", "quality": "high"},
        headers=tenant.headers,
    )
    assert answer.status_code == 429, answer.json
    assert answer.json["error"]["code"] == "spend_cap_reached" and "Retry-After" in answer.headers
    assert app.extensions["broker"].ledger.balance(tenant.account_id) == before  # nothing held
    assert client.get("/v1/jobs", headers=tenant.headers).json["data"] == []
    assert_invariant(app)


def test_a_call_without_max_tokens_is_sized_to_what_the_cap_allows(app, client, runner, tenant, upstream):
    """The balance (100 credits) affords the model's whole output; the cap affords far less: the hold,
    and so the output limit sent upstream, is what the cap allows."""
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    def sent_limit() -> int:
        answer = client.post("/v1/chat/completions", json=body, headers=tenant.headers)
        assert answer.status_code == 200, answer.json
        sent = upstream.requests[-1].json
        return sent.get("max_completion_tokens") or sent["max_tokens"]

    uncapped = sent_limit()
    limit(runner, tenant, CAP_CREDITS)
    capped = sent_limit()
    assert 0 < capped < uncapped
    assert charged_today(app, tenant) - 0 > 0
    assert_invariant(app)
