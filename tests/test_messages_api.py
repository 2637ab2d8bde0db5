"""Anthropic's Messages API on the broker, with the official ``anthropic`` SDK against a live server.

Anthropic models: the body reaches the fake Anthropic as sent (model name and ``max_tokens`` as
held, ``metadata.user_id`` namespaced), answers and events come back unchanged, and the charge
is the priced usage to the micro-credit (cache writes and reads at their rates) with a clean
reconcile. OpenAI and Gemini models are translated both ways. Every error is Anthropic's envelope,
so the SDK raises its own classes.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from decimal import Decimal

import anthropic
import pytest
import requests

from broker import pricing
from broker.chat import IMAGE_TOKEN_BOUND, account_namespace
from broker.limits import Limits
from broker.providers.anthropic import PDF_PAGE_TOKENS
from broker.schemas import AnthropicMessage
from tests.conftest import PROVIDER_KEYS, assert_invariant, make_tenant
from tests.fakes.upstreams import (
    ANTHROPIC_PDF_PAGE_TOKENS,
    ANTHROPIC_THINKING,
    Reply,
    anthropic_image_tokens,
    anthropic_signature,
    anthropic_token_count,
)
from tests.test_chat_billing import CREDIT_USD, LONG_PROMPT, MARKUP, PRICES, expected_ucr
from tests.test_chat_parity_anthropic import pdf, png
from tests.test_chat_parity_openai import PARIS, ROME, TWO_CALLS, balance, receipt

MODEL = "anthropic/claude-haiku-4-5"
UPSTREAM = "claude-haiku-4-5"
DATED = "claude-haiku-4-5-20251001"
ASK = [{"role": "user", "content": LONG_PROMPT + "What is the weather in Paris and in Rome?"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
PRICED = Reply(input_tokens=1200, cached_tokens=300, cache_write_tokens=100, cache_write_1h_tokens=40, output_tokens=57)


def sdk(live_server: str, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live_server, api_key=key, max_retries=0)


def sent(upstream, provider: str = "anthropic"):
    last = upstream.requests[-1]
    assert last.provider == provider
    return last


def assert_charged(app, client, tenant, before: int, request_id: str, model: str, reply: Reply) -> dict:
    """The charge is the priced usage to the micro-credit, within its hold, and the ledger balances."""
    want = expected_ucr(model, reply)
    assert before - balance(app, tenant) == want
    rec = receipt(client, tenant, request_id)
    assert rec["charged_ucr"] == want and rec["flags"] == {"estimated": False, "capped": False}
    assert rec["hold_ucr"] >= want and rec["model"] == model
    assert_invariant(app)
    return rec


def with_media(reply: Reply, tokens: int) -> Reply:
    return dataclasses.replace(reply, input_tokens=reply.input_tokens + tokens)


def raw_post(live_server: str, key: str, body: dict, **headers: str) -> requests.Response:
    return requests.post(
        live_server + "/v1/messages",
        json=body,
        headers={"x-api-key": key, "anthropic-version": "2023-06-01", **headers},
        stream=bool(body.get("stream")),
        timeout=30,
    )


def events_of(response: requests.Response) -> list[tuple[str, str]]:
    """(event, data) pairs of an SSE body, as sent."""
    pairs, name = [], ""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            pairs.append((name, line[6:]))
    return pairs


# -- Anthropic models: pass-through ---------------------------------------------------


def test_non_stream_passes_the_body_through_and_charges_the_priced_usage(app, live_server, tenant, upstream, client):
    upstream.queue(PRICED)
    before = balance(app, tenant)
    raw = sdk(live_server, tenant.key).messages.with_raw_response.create(
        model=DATED,
        max_tokens=300,
        system="You are terse.",
        messages=ASK,
        stop_sequences=["###"],
        metadata={"user_id": "alice"},
        # temperature: this SDK no longer lists it, older clients send it; diagnostics: accepted, not sent
        extra_body={"temperature": 0.5, "diagnostics": {"previous_message_id": "msg_someone_elses"}},
    )
    message = raw.parse()
    assert message.content[0].type == "text" and message.content[0].text == PRICED.text
    assert message.stop_reason == "end_turn" and message.model == UPSTREAM
    assert (message.usage.input_tokens, message.usage.output_tokens) == (1200, 57)
    assert (message.usage.cache_read_input_tokens, message.usage.cache_creation_input_tokens) == (300, 140)
    request_id = raw.headers["x-request-id"]
    assert message._request_id == request_id
    AnthropicMessage.model_validate(raw.http_response.json())  # the documented response model
    last = sent(upstream)
    assert last.path == "/v1/messages" and last.headers["x-api-key"] == PROVIDER_KEYS["ANTHROPIC_API_KEY"]
    assert last.json == {
        "model": UPSTREAM,  # the dated name resolved to the priced row
        "max_tokens": 300,
        "system": "You are terse.",
        "messages": ASK,
        "temperature": 0.5,
        "stop_sequences": ["###"],
        "metadata": {"user_id": f"{account_namespace(tenant.account_id)}-alice"},
    }
    rec = assert_charged(app, client, tenant, before, request_id, MODEL, PRICED)
    assert rec["endpoint"] == "messages"
    assert raw.headers["x-credits-charged"] == pricing.format_credits(rec["charged_ucr"])


def test_stream_helper_and_the_charge(app, live_server, tenant, upstream, client):
    reply = dataclasses.replace(PRICED, chunks=4)
    upstream.queue(reply)
    before = balance(app, tenant)
    with sdk(live_server, tenant.key).messages.stream(model=MODEL, max_tokens=300, messages=ASK) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert text == reply.text and final.content[0].text == reply.text
    assert (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens) == (1200, 57, 300)
    assert sent(upstream).json["stream"] is True
    rec = assert_charged(app, client, tenant, before, request_id, MODEL, reply)
    assert rec["stream"] is True


def test_streamed_events_are_relayed_unchanged(app, live_server, tenant, upstream):
    reply = Reply(chunks=3, input_tokens=40, output_tokens=12)
    upstream.queue(reply, reply)
    response = raw_post(live_server, tenant.key, {"model": MODEL, "max_tokens": 50, "messages": ASK, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    relayed = events_of(response)
    # The same body straight to the fake: the same events, byte for byte but for the message id.
    last = sent(upstream)
    direct = requests.post(
        upstream.anthropic_base + "/v1/messages",
        json=last.json,
        headers={"x-api-key": "k", "anthropic-version": "2023-06-01"},
        stream=True,
        timeout=10,
    )
    mid = json.loads(relayed[0][1])["message"]["id"]
    expected = [
        (n, d.replace(json.loads(d)["message"]["id"], mid) if n == "message_start" else d) for n, d in events_of(direct)
    ]
    assert relayed == expected
    assert [n for n, _ in relayed][:3] == ["message_start", "content_block_start", "ping"]
    assert relayed[-1] == ("message_stop", '{"type":"message_stop"}')
    assert_invariant(app)


def test_raw_stream_events_through_the_sdk(app, live_server, tenant, upstream, client):
    reply = Reply(input_tokens=300, output_tokens=20, chunks=2)
    upstream.queue(reply)
    before = balance(app, tenant)
    response = sdk(live_server, tenant.key).messages.with_raw_response.create(
        model=MODEL, max_tokens=100, messages=ASK, stream=True
    )
    kinds = [event.type for event in response.parse()]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_delta",
        "message_stop",
    ]
    assert_charged(app, client, tenant, before, response.headers["x-request-id"], MODEL, reply)


def test_tools_round_trip(app, live_server, tenant, upstream, client):
    answer = Reply(input_tokens=200, output_tokens=30, text="Sunny in both.")
    upstream.queue(TWO_CALLS, answer)
    api = sdk(live_server, tenant.key)
    before = balance(app, tenant)
    first = api.messages.with_raw_response.create(model=MODEL, max_tokens=200, messages=ASK, tools=[WEATHER_TOOL])
    message = first.parse()
    calls = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use"
    assert [(c.name, c.input) for c in calls] == [("get_weather", json.loads(PARIS)), ("get_weather", json.loads(ROME))]
    assert sent(upstream).json["tools"] == [WEATHER_TOOL]
    assert_charged(app, client, tenant, before, first.headers["x-request-id"], MODEL, TWO_CALLS)

    turns = [
        *ASK,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in message.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": calls[0].id, "content": "18C, sunny"},
                {"type": "tool_result", "tool_use_id": calls[1].id, "content": [{"type": "text", "text": "24C"}]},
            ],
        },
    ]
    before = balance(app, tenant)
    second = api.messages.with_raw_response.create(model=MODEL, max_tokens=200, messages=turns, tools=[WEATHER_TOOL])
    assert second.parse().content[0].text == "Sunny in both."
    assert sent(upstream).json["messages"] == turns  # every block as sent
    assert_charged(app, client, tenant, before, second.headers["x-request-id"], MODEL, answer)


def test_thinking_blocks_round_trip_signed_and_are_billed_as_output(app, live_server, tenant, upstream, client):
    reply = Reply(
        text="", tool_calls=[{"name": "get_weather", "arguments": PARIS}], reasoning_tokens=40, output_tokens=90
    )
    answer = Reply(text="It is sunny.", input_tokens=400, output_tokens=15)
    upstream.queue(reply, answer)
    api = sdk(live_server, tenant.key)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    beta = {"anthropic-beta": "interleaved-thinking-2025-05-14"}
    before = balance(app, tenant)
    first = api.messages.with_raw_response.create(
        model=MODEL, max_tokens=2000, messages=ASK, tools=[WEATHER_TOOL], thinking=thinking, extra_headers=beta
    )
    message = first.parse()
    assert [block.type for block in message.content] == ["thinking", "tool_use"]
    assert message.content[0].thinking == ANTHROPIC_THINKING
    assert message.content[0].signature == anthropic_signature(ANTHROPIC_THINKING)
    assert sent(upstream).headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert_charged(app, client, tenant, before, first.headers["x-request-id"], MODEL, reply)

    turns = [
        *ASK,
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": message.content[1].id, "content": "18C"}]},
    ]
    before = balance(app, tenant)
    with api.messages.stream(
        model=MODEL, max_tokens=2000, messages=turns, tools=[WEATHER_TOOL], thinking=thinking, extra_headers=beta
    ) as stream:
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    # The fake checks the signature of the thinking block sent back; a refusal would be a 400 here.
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert sent(upstream).json["messages"][1]["content"][0]["signature"] == anthropic_signature(ANTHROPIC_THINKING)
    assert_charged(app, client, tenant, before, request_id, MODEL, answer)


def test_cache_control_passes_and_cache_writes_and_reads_are_billed_at_their_rates(
    app, live_server, tenant, upstream, client
):
    reply = Reply(
        input_tokens=50, cached_tokens=3000, cache_write_tokens=500, cache_write_1h_tokens=200, output_tokens=20
    )
    upstream.queue(reply)
    system = [
        {"type": "text", "text": LONG_PROMPT * 2, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"type": "text", "text": LONG_PROMPT, "cache_control": {"type": "ephemeral"}},
    ]
    before = balance(app, tenant)
    raw = sdk(live_server, tenant.key).messages.with_raw_response.create(
        model=MODEL,
        max_tokens=100,
        system=system,
        messages=ASK,
        extra_headers={"anthropic-beta": "extended-cache-ttl-2025-04-11, not-a-real-beta-2099-01-01"},
    )
    usage = raw.parse().usage
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (3000, 700)
    assert usage.cache_creation.ephemeral_1h_input_tokens == 200
    last = sent(upstream)
    assert last.json["system"] == system
    assert last.headers["anthropic-beta"] == "extended-cache-ttl-2025-04-11"  # forwarded: priced
    assert raw.headers["x-anthropic-beta-ignored"] == "not-a-real-beta-2099-01-01"
    rec = assert_charged(app, client, tenant, before, raw.headers["x-request-id"], MODEL, reply)
    assert rec["tokens"]["cache_write"] == 500 and rec["tokens"]["cache_write_1h"] == 200
    assert rec["tokens"]["cached_input"] == 3000


def test_images_and_pdfs_pass_through_held_by_chats_bounds(app, live_server, tenant, upstream, client):
    image, document = png(800, 600), pdf(2)
    content = [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(image).decode()},
        },
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": base64.b64encode(document).decode()},
            "title": "report.pdf",
        },
        {"type": "text", "text": "Describe both."},
    ]
    upstream.queue(PRICED)
    before = balance(app, tenant)
    raw = sdk(live_server, tenant.key).messages.with_raw_response.create(
        model=MODEL, max_tokens=100, messages=[{"role": "user", "content": content}]
    )
    assert sent(upstream).json["messages"][0]["content"] == content
    billed = with_media(PRICED, anthropic_image_tokens(800, 600) + 2 * ANTHROPIC_PDF_PAGE_TOKENS)
    rec = assert_charged(app, client, tenant, before, raw.headers["x-request-id"], MODEL, billed)
    # Held as chat holds them: 2,000 tokens an image, 5,000 a PDF page (at the dearest input rate).
    rate = Decimal(PRICES[MODEL]["cache_write_1h"]) * MARKUP / CREDIT_USD  # µcr per million tokens
    media_bound = IMAGE_TOKEN_BOUND + 2 * PDF_PAGE_TOKENS
    assert rec["hold_ucr"] >= media_bound * rate


def test_a_broken_stream_charges_what_was_delivered(app, live_server, tenant, upstream, client):
    reply = Reply(text="One two three four five six", chunks=3, fault="error_event", fault_after=1, input_tokens=80)
    upstream.queue(reply)
    before = balance(app, tenant)
    response = raw_post(live_server, tenant.key, {"model": MODEL, "max_tokens": 100, "messages": ASK, "stream": True})
    relayed = events_of(response)
    assert relayed[-1][0] == "error" and json.loads(relayed[-1][1])["error"]["type"] == "overloaded_error"
    assert [n for n, _ in relayed].count("error") == 1  # Anthropic's own event, not a second one
    rec = receipt(client, tenant, response.headers["X-Request-Id"])
    assert rec["status"] == "partial" and rec["flags"]["estimated"] is True
    assert 0 < rec["charged_ucr"] == before - balance(app, tenant) <= rec["hold_ucr"]
    assert_invariant(app)


@pytest.mark.parametrize("model", [MODEL, "openai/gpt-4o-mini"])
def test_a_client_that_goes_away_mid_stream_is_charged_once_for_what_was_delivered(
    app, live_server, tenant, upstream, client, model
):
    upstream.queue(Reply(text="w " * 40, chunks=20, chunk_delay=0.1))
    before = balance(app, tenant)
    body = {"model": model, "max_tokens": 200, "messages": ASK, "stream": True}
    response = raw_post(live_server, tenant.key, body)
    lines = response.iter_lines()
    seen = [next(lines) for _ in range(12)]
    assert any(b'"text_delta"' in line for line in seen)
    response.close()
    deadline = time.time() + 10
    while time.time() < deadline and not client.get("/v1/usage", headers=tenant.headers).json["data"]:
        time.sleep(0.1)
    rec = client.get("/v1/usage", headers=tenant.headers).json["data"][0]
    assert rec["status"] == "partial" and rec["error_code"] == "client_disconnected"
    assert rec["flags"]["estimated"] is True and rec["endpoint"] == "messages"
    assert 0 < rec["charged_ucr"] <= rec["hold_ucr"]
    assert rec["tokens"]["output"] < 40  # far from the whole answer
    assert before - balance(app, tenant) == rec["charged_ucr"]
    assert_invariant(app)


# -- count_tokens ---------------------------------------------------------------------


def test_count_tokens_asks_anthropic_and_is_free(app, live_server, tenant, upstream):
    before = balance(app, tenant)
    count = sdk(live_server, tenant.key).messages.count_tokens(
        model=DATED, system="Be brief.", messages=ASK, tools=[WEATHER_TOOL]
    )
    last = sent(upstream)
    assert last.path == "/v1/messages/count_tokens" and last.json["model"] == UPSTREAM
    assert count.input_tokens == anthropic_token_count(last.json) > 0
    assert balance(app, tenant) == before
    assert_invariant(app)


def test_count_tokens_for_other_models_is_the_brokers_estimate(app, live_server, tenant, upstream):
    upstream.reset()
    count = sdk(live_server, tenant.key).messages.count_tokens(
        model="openai/gpt-4o-mini", system="Be brief.", messages=ASK
    )
    text = "Be brief.\n" + ASK[0]["content"]
    assert count.input_tokens == pricing.text_token_estimate(text) + 4 * 2
    assert upstream.requests == []


# -- errors: Anthropic's envelope, the SDK's own classes -------------------------------


def test_a_bad_key_is_an_authentication_error(live_server, upstream):
    with pytest.raises(anthropic.AuthenticationError) as caught:
        sdk(live_server, "brk_live_not-a-key").messages.create(model=MODEL, max_tokens=10, messages=ASK)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "authentication_error"
    assert caught.value.request_id and caught.value.body["request_id"] == caught.value.request_id


def test_an_unknown_model_is_not_found_and_charges_nothing(app, live_server, tenant, upstream):
    before = balance(app, tenant)
    with pytest.raises(anthropic.NotFoundError) as caught:
        sdk(live_server, tenant.key).messages.create(model="claude-nope-9-20990101", max_tokens=10, messages=ASK)
    assert caught.value.body["error"] == {
        "type": "not_found_error",
        "message": "The model 'claude-nope-9-20990101' does not exist or is not available. "
        "GET /v1/models lists the models you can use.",
    }
    assert balance(app, tenant) == before


def test_rate_limit_is_a_rate_limit_error(app, live_server, tenant, upstream):
    app.config["DEFAULT_LIMITS"] = Limits(1, 1000, 0)
    api = sdk(live_server, tenant.key)
    api.messages.count_tokens(model=MODEL, messages=ASK)
    with pytest.raises(anthropic.RateLimitError) as caught:
        api.messages.create(model=MODEL, max_tokens=10, messages=ASK)
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert int(caught.value.response.headers["retry-after"]) > 0


def test_too_large_is_413_in_anthropics_envelope(app, live_server, tenant):
    app.config["MAX_CONTENT_LENGTH"] = 4096
    response = raw_post(live_server, tenant.key, {"model": MODEL, "max_tokens": 10, "messages": ASK * 3})
    assert response.status_code == 413
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "request_too_large"
    assert body["request_id"] == response.headers["request-id"] == response.headers["X-Request-Id"]


def test_an_idempotency_conflict_is_409_in_anthropics_envelope(app, live_server, tenant, upstream):
    upstream.queue(Reply(input_tokens=30, output_tokens=5))
    api = sdk(live_server, tenant.key)
    key = {"Idempotency-Key": "messages-1"}
    api.messages.create(model=MODEL, max_tokens=10, messages=ASK, extra_headers=key)
    with pytest.raises(anthropic.ConflictError) as caught:
        api.messages.create(model=MODEL, max_tokens=11, messages=ASK, extra_headers=key)
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"


def test_insufficient_credits_is_402_billing_error(app, live_server, upstream):
    poor = make_tenant("0.000001")
    upstream.reset()
    with pytest.raises(anthropic.PaymentRequiredError) as caught:
        sdk(live_server, poor.key).messages.create(model=MODEL, max_tokens=1000, messages=ASK)
    assert caught.value.body["error"]["type"] == "billing_error"
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
        ({"extra_headers": {"anthropic-beta": "context-1m-2025-08-07"}}, "long-context"),
        ({"extra_body": {"speed": "fast"}}, "speed"),
        ({"extra_body": {"container": "c1"}}, "container"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "document", "source": {"type": "url", "url": "https://x.test/a.pdf"}}],
                    }
                ]
            },
            "URL",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f1"}}]}
                ]
            },
            "uploaded files",
        ),
    ],
)
def test_what_is_not_priced_or_not_ours_is_refused_before_the_hold(app, live_server, tenant, upstream, extra, needle):
    upstream.reset()
    before = balance(app, tenant)
    kwargs = {"model": MODEL, "max_tokens": 10, "messages": ASK, **extra}
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk(live_server, tenant.key).messages.create(**kwargs)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert needle in caught.value.body["error"]["message"]
    assert upstream.requests == [] and balance(app, tenant) == before


def test_anthropics_own_errors_keep_their_class_and_release_the_hold(app, live_server, tenant, upstream, client):
    upstream.default = Reply(status=529, error_message="Overloaded")  # past the session's retries too
    before = balance(app, tenant)
    with pytest.raises(anthropic.ServiceUnavailableError) as caught:
        sdk(live_server, tenant.key).messages.create(model=MODEL, max_tokens=10, messages=ASK)
    assert caught.value.body["error"]["type"] == "overloaded_error"
    assert balance(app, tenant) == before
    assert receipt(client, tenant, caught.value.request_id)["charged_ucr"] == 0
    assert_invariant(app)


# -- OpenAI and Gemini models, translated ---------------------------------------------


def test_an_openai_model_through_messages(app, live_server, tenant, upstream, client):
    reply = Reply(
        tool_calls=[{"name": "get_weather", "arguments": PARIS}], input_tokens=900, cached_tokens=100, output_tokens=40
    )
    upstream.queue(reply)
    before = balance(app, tenant)
    image = base64.b64encode(png(16, 16)).decode()
    raw = sdk(live_server, tenant.key).messages.with_raw_response.create(
        model="openai/gpt-4o-mini",
        max_tokens=200,
        system="You are terse.",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": ASK[0]["content"]},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": image}},
                ],
            }
        ],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "any"},
    )
    message = raw.parse()
    assert message.stop_reason == "tool_use" and message.model == "openai/gpt-4o-mini"
    assert [(b.type, b.name, b.input) for b in message.content] == [("tool_use", "get_weather", {"city": "Paris"})]
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == (
        900,
        100,
        40,
    )
    body = sent(upstream, "openai").json
    assert body["messages"][0] == {"role": "system", "content": "You are terse."}
    assert body["messages"][1]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": f"data:image/png;base64,{image}"},
    }
    assert body["tools"][0]["function"]["parameters"] == WEATHER_TOOL["input_schema"]
    assert body["tool_choice"] == "required"
    rec = assert_charged(app, client, tenant, before, raw.headers["x-request-id"], "openai/gpt-4o-mini", reply)
    assert rec["endpoint"] == "messages"


def test_a_gemini_model_streams_through_messages(app, live_server, tenant, upstream, client):
    reply = Reply(text="Bonjour from Gemini, streamed.", chunks=3, input_tokens=700, output_tokens=30)
    upstream.queue(reply)
    before = balance(app, tenant)
    with sdk(live_server, tenant.key).messages.stream(
        model="gemini/gemini-2.5-flash", max_tokens=200, system="Be brief.", messages=ASK
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert text == reply.text and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (700, 30)
    assert sent(upstream, "gemini").json["systemInstruction"]["parts"][0]["text"] == "Be brief."
    assert_charged(app, client, tenant, before, request_id, "gemini/gemini-2.5-flash", reply)


def test_an_openai_tool_call_streams_as_tool_use_blocks(app, live_server, tenant, upstream, client):
    upstream.queue(TWO_CALLS)
    before = balance(app, tenant)
    with sdk(live_server, tenant.key).messages.stream(
        model="openai/gpt-4o-mini", max_tokens=200, messages=ASK, tools=[WEATHER_TOOL]
    ) as stream:
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert final.stop_reason == "tool_use"
    assert [(b.type, b.input) for b in final.content] == [
        ("tool_use", {"city": "Paris"}),
        ("tool_use", {"city": "Rome"}),
    ]
    assert_charged(app, client, tenant, before, request_id, "openai/gpt-4o-mini", TWO_CALLS)


# -- marketplace and the documents ----------------------------------------------------


def test_marketplace_callers_are_metered_not_charged(app, client, upstream):
    from tests.conftest import RAPIDAPI_SECRET

    rapid = {
        "X-RapidAPI-Proxy-Secret": RAPIDAPI_SECRET,
        "X-RapidAPI-User": "claude_coder",
        "X-RapidAPI-Subscription": "PRO",
    }
    upstream.queue(PRICED)
    body = {"model": MODEL, "max_tokens": 100, "messages": ASK}
    response = client.post("/v1/messages", json=body, headers={**rapid, "anthropic-version": "2023-06-01"})
    assert response.status_code == 200 and response.headers["X-Credits-Charged"] == "0.000000"
    usage = client.get("/v1/usage", headers=rapid).json["data"]
    assert len(usage) == 1 and usage[0]["charged_ucr"] == 0 and usage[0]["endpoint"] == "messages"
    assert usage[0]["tokens"]["input"] == 1200 and usage[0]["detail"]["plan"] == "PRO"
    assert_invariant(app)


def test_the_openapi_document_gives_anthropics_error_envelope_and_it_is_what_is_answered(client, tenant):
    from broker.schemas import AnthropicErrorResponse

    spec = client.get("/openapi.json").json
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        responses = spec["paths"][path]["post"]["responses"]
        for code in ("400", "401", "413", "429"):
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/AnthropicErrorResponse"}, (path, code)
    assert spec["paths"]["/v1/chat/completions"]["post"]["responses"]["401"]["content"]["application/json"][
        "schema"
    ] == {"$ref": "#/components/schemas/ErrorResponse"}
    answered = client.post("/v1/messages", json={"model": MODEL}, headers=tenant.headers)
    assert answered.status_code == 400
    AnthropicErrorResponse.model_validate(answered.json)
    assert (
        answered.json["error"]["type"] == "invalid_request_error" and "max_tokens" in answered.json["error"]["message"]
    )
