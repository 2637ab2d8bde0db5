"""``POST /v1/responses`` with the official openai SDK: OpenAI's Responses API passed through and metered,
stored responses bound to the account that made them, and what is refused before anything is held."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import openai
import pytest

from tests.conftest import assert_invariant, make_tenant
from tests.fakes.upstreams import Reply

PRICES = json.loads((Path(__file__).parent.parent / "broker" / "prices.json").read_text())["models"]
MARKUP = Decimal("1.8")
CREDIT_USD = Decimal("0.01")
MODEL = "openai/gpt-4o-mini"
PROMPT = "Price me exactly. " * 120  # room for the token counts the fake reports
REPLY = Reply(
    text="Hello from the Responses API.", input_tokens=1200, cached_tokens=300, output_tokens=57, reasoning_tokens=7
)


def expected_ucr(r: Reply, model: str = MODEL) -> int:
    p = {k: Decimal(v) for k, v in PRICES[model].items() if k in ("input", "cached_input", "output")}
    usd = (r.input_tokens * p["input"] + r.cached_tokens * p["cached_input"] + r.output_tokens * p["output"]) / Decimal(
        1_000_000
    )
    return math.ceil(usd * MARKUP / CREDIT_USD * 1_000_000)


def sdk(live_server: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server + "/v1", api_key=key, max_retries=0)


def credits(ucr: int) -> str:
    return f"{ucr // 1_000_000}.{ucr % 1_000_000:06d}"


def balance(app, tenant) -> int:
    return app.extensions["broker"].ledger.balance(tenant.account_id)


def held(app, tenant) -> int:
    return app.extensions["broker"].ledger.snapshot(tenant.account_id)["held"]


def test_non_stream_is_charged_from_usage_and_passed_through(app, live_server, tenant, upstream, client):
    upstream.queue(REPLY)
    before = balance(app, tenant)
    raw = sdk(live_server, tenant.key).responses.with_raw_response.create(
        model=MODEL,
        input=PROMPT,
        instructions="Be brief.",
        max_output_tokens=300,
        metadata={"ticket": "42"},
        user="end-user-7",
    )
    response = raw.parse()
    want = expected_ucr(REPLY)

    assert before - balance(app, tenant) == want
    assert raw.headers["X-Credits-Charged"] == credits(want)
    assert response.output_text == REPLY.text
    assert response.model == MODEL
    assert response.usage.input_tokens == 1500 and response.usage.input_tokens_details.cached_tokens == 300
    assert response.usage.output_tokens_details.reasoning_tokens == 7
    assert response.usage.model_extra["cost_credits"] == float(credits(want))
    # The client sees its own identifiers; OpenAI saw them namespaced per account.
    assert response.metadata == {"ticket": "42"} and response.user == "end-user-7"
    sent = upstream.requests[-1]
    assert sent.path == "/v1/responses" and sent.json["model"] == "gpt-4o-mini"
    assert sent.json["max_output_tokens"] == 300 and sent.json["instructions"] == "Be brief."
    assert sent.json["user"].endswith("-end-user-7") and sent.json["user"] != "end-user-7"
    assert sent.json["metadata"]["ticket"].endswith("-42")
    assert "background" not in sent.json
    receipt = client.get(f"/v1/requests/{raw.headers['X-Request-Id']}", headers=tenant.headers).json
    assert receipt["endpoint"] == "responses" and receipt["charged_ucr"] == want
    assert receipt["tokens"] == {
        "input": 1200,
        "cached_input": 300,
        "cache_write": 0,
        "cache_write_1h": 0,
        "output": 57,
    }
    assert receipt["flags"] == {"estimated": False, "capped": False}
    assert_invariant(app)


def test_stream_helper_gets_the_events_and_the_charge_is_the_completed_usage(
    app, live_server, tenant, upstream, client
):
    upstream.queue(REPLY)
    before = balance(app, tenant)
    with sdk(live_server, tenant.key).responses.stream(model=MODEL, input=PROMPT, max_output_tokens=300) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    want = expected_ucr(REPLY)

    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and kinds.count("response.output_text.delta") == 3
    assert final.output_text == REPLY.text and final.model == MODEL
    assert final.usage.model_extra["cost_credits"] == float(credits(want))
    assert before - balance(app, tenant) == want
    assert upstream.requests[-1].json["stream"] is True
    usage = client.get("/v1/usage", headers=tenant.headers).json["data"][0]
    assert usage["endpoint"] == "responses" and usage["stream"] is True and usage["charged_ucr"] == want
    assert usage["flags"]["estimated"] is False
    assert_invariant(app)


def test_a_cut_stream_is_charged_for_what_was_delivered_and_flagged(app, live_server, tenant, upstream, client):
    upstream.queue(Reply(text="one two three four five six", chunks=3, fault="truncate", fault_after=1))
    before = balance(app, tenant)
    events = list(
        sdk(live_server, tenant.key).responses.create(model=MODEL, input="Hi", max_output_tokens=100, stream=True)
    )
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    # The Responses API's own error event ends the stream (the SDK yields it, as from OpenAI).
    assert events[-1].type == "error" and events[-1].code == "upstream_stream_broken"
    assert deltas == ["one two t"]
    charged = before - balance(app, tenant)
    assert held(app, tenant) == 0
    usage = client.get("/v1/usage", headers=tenant.headers).json["data"][0]
    assert usage["status"] == "partial" and usage["flags"]["estimated"] is True
    assert 0 < charged == usage["charged_ucr"] <= usage["hold_ucr"]
    assert usage["tokens"]["output"] == 3  # "one two t" is 9 bytes: about 3 tokens
    assert_invariant(app)


def test_stored_responses_are_bound_to_the_account_that_made_them(app, live_server, tenant, upstream, client):
    first = sdk(live_server, tenant.key).responses.create(model=MODEL, input="Remember 7.")
    assert first.id.startswith("resp_")
    other = make_tenant()
    other_client = sdk(live_server, other.key)
    calls = len(upstream.requests)
    before = balance(app, other)

    with pytest.raises(openai.NotFoundError) as refused:
        other_client.responses.create(model=MODEL, input="What number?", previous_response_id=first.id)
    assert refused.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        other_client.responses.retrieve(first.id)
    item = first.output[0].model_dump(exclude_none=True)
    with pytest.raises(openai.NotFoundError):
        other_client.responses.create(model=MODEL, input=[item, {"role": "user", "content": "And now?"}])
    assert len(upstream.requests) == calls  # nothing reached OpenAI
    assert balance(app, other) == before and held(app, other) == 0

    # The account that made it continues the conversation and reads it back.
    upstream.queue(Reply(input_tokens=40))
    second = sdk(live_server, tenant.key).responses.create(
        model=MODEL, input="What number?", previous_response_id=first.id
    )
    assert upstream.requests[-1].json["previous_response_id"] == first.id
    assert second.previous_response_id == first.id
    again = sdk(live_server, tenant.key).responses.retrieve(first.id)
    assert again.id == first.id and again.model == MODEL and again.output_text == first.output_text
    unstored = sdk(live_server, tenant.key).responses.create(model=MODEL, input="Forget it.", store=False)
    with pytest.raises(openai.NotFoundError) as gone:
        sdk(live_server, tenant.key).responses.retrieve(unstored.id)
    assert "No response" in gone.value.message
    assert_invariant(app)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}, {"type": "file_search"}]}, "tools[1]"),
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "tools[0]"),
        ({"background": True}, "background"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"model": "anthropic/claude-haiku-4-5"}, "model"),
        ({"model": "gemini/gemini-2.5-flash"}, "model"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-abc"}]}]}, "input"),
    ],
)
def test_refusals_hold_and_call_nothing(extra, param, app, live_server, tenant, upstream):
    before = balance(app, tenant)
    body = {"model": MODEL, "input": "Hi", **extra}
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(live_server, tenant.key).responses.create(**body)
    assert refused.value.body["param"] == param
    assert upstream.requests == []
    assert balance(app, tenant) == before and held(app, tenant) == 0
    assert_invariant(app)


def test_function_tools_pass_through_and_the_call_comes_back(app, live_server, tenant, upstream):
    upstream.queue(Reply(tool_calls=[{"name": "lookup", "arguments": '{"q": "x"}'}], output_tokens=20))
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]
    before = balance(app, tenant)
    response = sdk(live_server, tenant.key).responses.create(model=MODEL, input="Look it up", tools=tools)
    call = response.output[0]
    assert call.type == "function_call" and call.name == "lookup" and call.arguments == '{"q": "x"}'
    assert upstream.requests[-1].json["tools"] == tools
    assert before - balance(app, tenant) == expected_ucr(Reply(output_tokens=20))
    assert_invariant(app)


def test_marketplace_callers_are_metered_not_charged(app, client, upstream):
    from tests.conftest import RAPIDAPI_SECRET

    rapid = {
        "X-RapidAPI-Proxy-Secret": RAPIDAPI_SECRET,
        "X-RapidAPI-User": "responder",
        "X-RapidAPI-Subscription": "PRO",
    }
    upstream.queue(REPLY)
    response = client.post("/v1/responses", json={"model": MODEL, "input": PROMPT}, headers=rapid)
    assert response.status_code == 200 and response.headers["X-Credits-Charged"] == "0.000000"
    usage = client.get("/v1/usage", headers=rapid).json["data"][0]
    assert usage["endpoint"] == "responses" and usage["charged_ucr"] == 0 and usage["tokens"]["output"] == 57
    assert usage["detail"]["plan"] == "PRO"
    assert_invariant(app)
