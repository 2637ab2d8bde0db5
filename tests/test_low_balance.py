"""A small balance and no ``max_tokens``: never an answer silently cut to a few tokens (issue 12 item 9)."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import assert_invariant, make_tenant

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
# gpt-4o-mini output: $0.60 per 1M × 1.8 ÷ $0.01 = 108 µcr a token, so 1,024 tokens need ~0.11 credits.


def sdk(live_server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server + "/v1", api_key=key, max_retries=0)


def sent_limit(upstream) -> int:
    """The output limit the adapter sent OpenAI (it sends ``max_completion_tokens``)."""
    body = upstream.requests[-1].json
    return body.get("max_completion_tokens") or body["max_tokens"]


def test_without_max_tokens_a_balance_below_the_floor_is_a_402_saying_what_is_needed(app, live_server, upstream):
    tenant = make_tenant("0.05")
    with pytest.raises(openai.APIStatusError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    assert raised.value.status_code == 402
    message = raised.value.body["message"]
    assert "at least 1,024 output tokens" in message and "max_tokens" in message
    assert upstream.requests == []  # nothing sent, nothing held
    snapshot = app.extensions["broker"].ledger.snapshot(tenant.account_id)
    assert snapshot["holds_sum"] == 0 and snapshot["balance"] == 50_000
    assert_invariant(app)


def test_an_explicit_small_max_tokens_still_goes_through(app, live_server, upstream):
    tenant = make_tenant("0.05")
    answer = sdk(live_server, tenant.key).chat.completions.create(
        model="openai/gpt-4o-mini", messages=MESSAGES, max_tokens=20
    )
    assert answer.choices[0].message.content
    assert sent_limit(upstream) == 20
    assert_invariant(app)


def test_above_the_floor_the_hold_and_the_upstream_limit_are_at_least_the_floor(app, live_server, upstream):
    tenant = make_tenant("0.2")  # affords ~1,800 output tokens after the prompt
    sdk(live_server, tenant.key).chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    assert 1024 <= sent_limit(upstream) < 16384  # what the balance affords, never below the floor
    assert_invariant(app)


def test_the_floor_is_a_setting(app, live_server, upstream):
    app.extensions["broker"].metering.min_output_tokens = 100
    tenant = make_tenant("0.05")
    sdk(live_server, tenant.key).chat.completions.create(model="openai/gpt-4o-mini", messages=MESSAGES)
    assert 100 <= sent_limit(upstream) < 1024
    assert_invariant(app)


def test_a_thinking_request_without_max_tokens_needs_its_budget_on_top_of_the_floor(app, live_server, upstream):
    """reasoning_effort "low" is a 2,048-token thinking budget on Anthropic: the floor becomes 1,024 + 2,048."""
    # claude-haiku-4-5 output: $5 per 1M × 1.8 ÷ $0.01 = 900 µcr a token; 2,000 tokens ≈ 1.8 credits.
    tenant = make_tenant("2")
    with pytest.raises(openai.APIStatusError) as raised:
        sdk(live_server, tenant.key).chat.completions.create(
            model="anthropic/claude-haiku-4-5", messages=MESSAGES, reasoning_effort="low"
        )
    assert raised.value.status_code == 402 and "at least 3,072 output tokens" in raised.value.body["message"]
    assert upstream.requests == []
    # Without thinking the same balance affords the plain floor.
    sdk(live_server, tenant.key).chat.completions.create(model="anthropic/claude-haiku-4-5", messages=MESSAGES)
    assert_invariant(app)
