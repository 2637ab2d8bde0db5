"""Charges equal the provider's priced usage × markup, rounded up to the µcr, for every provider."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from tests.conftest import assert_invariant
from tests.fakes.upstreams import Reply

PRICES = json.loads((Path(__file__).parent.parent / "broker" / "prices.json").read_text())["models"]
MARKUP = Decimal("1.8")
CREDIT_USD = Decimal("0.01")

CASES = {
    "openai/gpt-4o-mini": Reply(
        input_tokens=1200, cached_tokens=300, cache_write_tokens=100, output_tokens=57, reasoning_tokens=7
    ),
    "anthropic/claude-haiku-4-5": Reply(
        input_tokens=1200,
        cached_tokens=300,
        cache_write_tokens=100,
        cache_write_1h_tokens=40,
        output_tokens=57,
    ),
    "gemini/gemini-2.5-flash": Reply(input_tokens=1200, cached_tokens=300, output_tokens=57, reasoning_tokens=20),
}


def expected_ucr(model: str, r: Reply) -> int:
    """The charge computed independently of the broker, straight from the price file."""
    p = {
        k: Decimal(v)
        for k, v in PRICES[model].items()
        if k in ("input", "cached_input", "cache_write", "cache_write_1h", "output")
    }
    write = p.get("cache_write", p["input"])
    write_1h = p.get("cache_write_1h", write)
    usd = (
        r.input_tokens * p["input"]
        + r.cached_tokens * p["cached_input"]
        + r.cache_write_tokens * write
        + r.cache_write_1h_tokens * write_1h
        + r.output_tokens * p["output"]
    ) / Decimal(1_000_000)
    return math.ceil(usd * MARKUP / CREDIT_USD * 1_000_000)


LONG_PROMPT = "Price me exactly. " * 120  # 2,160 bytes: room for the token counts the fake reports


def sdk(live_server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server + "/v1", api_key=key, max_retries=0)


def credits(ucr: int) -> str:
    return f"{ucr // 1_000_000}.{ucr % 1_000_000:06d}"


@pytest.mark.parametrize("model", sorted(CASES))
def test_non_stream_charge_is_priced_usage_times_markup(model, app, live_server, tenant, upstream, client):
    upstream.queue(CASES[model])
    before = app.extensions["broker"].ledger.balance(tenant.account_id)
    raw = sdk(live_server, tenant.key).chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": LONG_PROMPT}], max_tokens=200
    )
    completion = raw.parse()
    want = expected_ucr(model, CASES[model])
    after = app.extensions["broker"].ledger.balance(tenant.account_id)

    assert before - after == want
    assert raw.headers["X-Credits-Charged"] == credits(want)
    assert raw.headers["X-Credits-Remaining"] == credits(after)
    assert completion.usage.model_extra["cost_credits"] == float(credits(want))
    assert completion.choices[0].message.content == CASES[model].text
    request_id = raw.headers["X-Request-Id"]
    receipt = client.get(f"/v1/requests/{request_id}", headers=tenant.headers).json
    assert receipt["charged_ucr"] == want
    assert receipt["credits_charged"] == credits(want)
    assert receipt["flags"] == {"estimated": False, "capped": False}
    assert receipt["tokens"]["output"] == CASES[model].output_tokens
    assert receipt["tokens"]["cached_input"] == CASES[model].cached_tokens
    assert Decimal(receipt["provider_cost_usd"]) * MARKUP / CREDIT_USD * 1_000_000 <= want
    assert_invariant(app)


@pytest.mark.parametrize("model", sorted(CASES))
def test_stream_charge_matches_final_usage_chunk_receipt_and_ledger(model, app, live_server, tenant, upstream, client):
    upstream.queue(CASES[model])
    before = app.extensions["broker"].ledger.balance(tenant.account_id)
    stream = sdk(live_server, tenant.key).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": LONG_PROMPT}],
        max_tokens=200,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = chunks[-1]
    want = expected_ucr(model, CASES[model])

    assert text == CASES[model].text
    assert final.choices == []
    assert final.usage.completion_tokens == CASES[model].output_tokens
    assert final.usage.model_extra["cost_credits"] == float(credits(want))
    assert before - app.extensions["broker"].ledger.balance(tenant.account_id) == want
    request_id = "req_" + final.id.removeprefix("chatcmpl-")
    receipt = client.get(f"/v1/requests/{request_id}", headers=tenant.headers).json
    assert receipt["charged_ucr"] == want
    assert receipt["stream"] is True
    assert receipt["flags"]["estimated"] is False
    assert_invariant(app)


def test_anthropic_stream_takes_last_cumulative_output_count_not_the_sum(app, live_server, tenant, upstream):
    reply = Reply(input_tokens=50, output_tokens=40)
    upstream.queue(reply)
    before = app.extensions["broker"].ledger.balance(tenant.account_id)
    chunks = list(
        sdk(live_server, tenant.key).chat.completions.create(
            model="anthropic/claude-haiku-4-5",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=100,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 40
    assert before - app.extensions["broker"].ledger.balance(tenant.account_id) == expected_ucr(
        "anthropic/claude-haiku-4-5", reply
    )


def test_without_include_usage_no_usage_chunk_reaches_the_client_but_the_receipt_has_the_cost(
    app, live_server, tenant, upstream, client
):
    upstream.queue(CASES["openai/gpt-4o-mini"])
    before = app.extensions["broker"].ledger.balance(tenant.account_id)
    raw = sdk(live_server, tenant.key).chat.completions.with_raw_response.create(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": LONG_PROMPT}],
        max_tokens=200,
        stream=True,
    )
    chunks = list(raw.parse())
    assert chunks and all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    sent = upstream.requests[-1].json
    assert sent["stream_options"] == {"include_usage": True}  # we still bill from the provider's usage
    assert sent["max_completion_tokens"] == 200
    want = expected_ucr("openai/gpt-4o-mini", CASES["openai/gpt-4o-mini"])
    assert before - app.extensions["broker"].ledger.balance(tenant.account_id) == want
    receipt = client.get(f"/v1/requests/{raw.headers['X-Request-Id']}", headers=tenant.headers).json
    assert receipt["charged_ucr"] == want and receipt["flags"]["estimated"] is False


def test_seed_chat_shape_uses_the_same_metered_path(client, tenant, upstream, app):
    upstream.queue(CASES["openai/gpt-4o-mini"])
    response = client.post(
        "/v1/chat",
        json={
            "provider": "openai",
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": LONG_PROMPT}],
            "max_tokens": 99,
        },
        headers=tenant.headers,
    )
    assert response.status_code == 200, response.json
    assert response.json["usage"]["cost_credits"] == float(
        credits(expected_ucr("openai/gpt-4o-mini", CASES["openai/gpt-4o-mini"]))
    )
    assert_invariant(app)


def test_bare_model_name_maps_to_its_only_provider(client, tenant, upstream):
    response = client.post(
        "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5},
        headers=tenant.headers,
    )
    assert response.status_code == 200
    assert response.json["model"] == "openai/gpt-4o-mini"
    assert upstream.requests[-1].json["model"] == "gpt-4o-mini"
