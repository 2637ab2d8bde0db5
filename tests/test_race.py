"""Concurrent requests can never spend the same credit twice."""

from __future__ import annotations

import threading
from collections import Counter

import requests

from broker import chat
from tests.conftest import assert_invariant, make_tenant
from tests.fakes.upstreams import Reply

# gpt-4o-mini: 27 µcr per input token and 108 per output token at 1.8× and $0.01 a credit.
MESSAGES = [{"role": "user", "content": "race"}]
MAX_TOKENS = 10


def test_200_simultaneous_requests_against_a_balance_for_50_admit_exactly_50(app, live_server, upstream):
    bound, _ = chat.input_token_bound(MESSAGES)
    per_request = bound * 27 + MAX_TOKENS * 108
    # The fake reports exactly the usage the hold covers, so each success costs its hold.
    upstream.default = Reply(input_tokens=bound, output_tokens=MAX_TOKENS)
    tenant = make_tenant("0")
    ledger = app.extensions["broker"].ledger
    ledger.grant(app.extensions["broker"].db(), tenant.account_id, 50 * per_request, "race-grant", "race")

    barrier = threading.Barrier(200)
    statuses: list[int] = []
    lowest = [ledger.balance(tenant.account_id)]

    def one() -> None:
        with requests.Session() as session:
            barrier.wait()
            response = session.post(
                f"{live_server}/v1/chat/completions",
                json={"model": "openai/gpt-4o-mini", "messages": MESSAGES, "max_tokens": MAX_TOKENS},
                headers=tenant.headers,
                timeout=60,
            )
            statuses.append(response.status_code)
            lowest.append(ledger.balance(tenant.account_id))

    threads = [threading.Thread(target=one) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert Counter(statuses) == {200: 50, 402: 150}
    assert min(lowest) >= 0
    assert ledger.balance(tenant.account_id) == 0
    assert len(upstream.requests) == 50
    assert_invariant(app)
